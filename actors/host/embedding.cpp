#include "actors/host/embedding.hpp"

#include <malloc.h>

#include <cstdlib>

#include <caf/actor_system.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>

#include "actors/host/job_control.hpp"
#include "actors/host/runner_host.hpp"
#include "actors/sinks/job_recorder.hpp"
#include "actors/vm/job_supervisor.hpp"
#include "runtime/job/disk_limits.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_records.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/recovery.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

void limit_malloc_arenas() {
  const char* set = std::getenv("MALLOC_ARENA_MAX");
  if (set == nullptr || *set == '\0')
    ::mallopt(M_ARENA_MAX, 2);
}

Result<std::vector<RecoveredJob>> recover_abandoned_jobs_at_start(const v1::RunnerConfig& config) {
  return recover_abandoned_jobs(config);
}

Result<StartedJob> start_job(caf::actor_system& sys, v1::JobSpec job,
                             const v1::RunnerConfig& config, event_sink_actor events) {
  if (job.id().empty())
    job.set_id(make_job_id());
  auto claim = JobClaim::take(config, job.id(), false);
  if (!claim)
    return fail(claim.error().message);
  return start_job(sys, std::move(job), config, std::move(events), std::move(*claim));
}

Result<StartedJob> start_job(caf::actor_system& sys, v1::JobSpec job,
                             const v1::RunnerConfig& config, event_sink_actor events,
                             std::shared_ptr<JobClaim> claim) {
  if (!claim || claim->job_dir() != job_dir_for(config, job.id()))
    return fail("internal: job " + job.id() + " is started without the claim of its id");
  // Nothing but the claimed, empty record exists yet: a job that cannot start
  // leaves nothing behind.
  auto refuse = [&](const Error& error) {
    claim->remove_record();
    return tl::unexpected(error);
  };
  if (auto ok = validate_job(job, config); !ok)
    return refuse(Error{"the job is not valid:\n" + ok.error().message});
  if (auto room = check_free_space(config); !room)
    return refuse(room.error());
  auto image = resolve_image(job, config);
  if (!image)
    return refuse(image.error());
  if (!job.runs_on().empty())
    mark_image_used(config, job.runs_on());  // `image list` shows when a label was last used
  auto job_dir = claim->job_dir();
  auto log = EventLog::open(job_dir / "events.jsonl", disk_limits_of(config).events_max_bytes);
  if (!log)
    return refuse(log.error());
  // Which process runs the job: `jobs list` tells running from abandoned by it.
  if (auto owned = write_job_owner(job_dir, job.id()); !owned)
    return refuse(owned.error());
  auto recorder = sys.spawn<caf::detached>(
    job_recorder, std::make_shared<EventLog>(std::move(*log)), job_dir.string());
  std::vector<event_sink_actor> sinks{recorder};
  if (events)
    sinks.push_back(events);
  auto supervisor = sys.spawn(job_supervisor, job, *image, config, sinks, real_vm_children(),
                              supervisor_timeouts{});
  // The id stays claimed until the VM is gone (the supervisor ends after its
  // clean-up) and the record is complete (the recorder ends after the result).
  for (auto holder : {caf::actor_cast<caf::actor>(supervisor), caf::actor_cast<caf::actor>(recorder)})
    caf::actor_cast<caf::abstract_actor*>(holder)->attach_functor([claim](const caf::error&) {});
  caf::anon_send(supervisor, start_atom::value);
  watch_cancel_requests(sys, supervisor, job_dir);  // `solstice-runner jobs cancel`
  return StartedJob{job.id(), job_dir.string(), supervisor, recorder};
}

}  // namespace solstice
