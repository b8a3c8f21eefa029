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
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_records.hpp"
#include "runtime/job/runner_config.hpp"
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
  if (auto ok = validate_job(job, config); !ok)
    return fail("the job is not valid:\n" + ok.error().message);
  auto image = resolve_image(job, config);
  if (!image)
    return tl::unexpected(image.error());
  if (job.id().empty())
    job.set_id(make_job_id());
  auto job_dir = job_dir_for(config, job.id());
  if (auto ok = make_private_dir(job_dir); !ok)
    return tl::unexpected(ok.error());
  auto log = EventLog::open(job_dir / "events.jsonl");
  if (!log)
    return tl::unexpected(log.error());
  // Which process runs the job: `jobs list` tells running from abandoned by it.
  if (auto owned = write_job_owner(job_dir, job.id()); !owned)
    return tl::unexpected(owned.error());
  auto recorder = sys.spawn<caf::detached>(
    job_recorder, std::make_shared<EventLog>(std::move(*log)), job_dir.string());
  std::vector<event_sink_actor> sinks{recorder};
  if (events)
    sinks.push_back(events);
  auto supervisor = sys.spawn(job_supervisor, job, *image, config, sinks, real_vm_children(),
                              supervisor_timeouts{});
  caf::anon_send(supervisor, start_atom::value);
  watch_cancel_requests(sys, supervisor, job_dir);  // `solstice-runner jobs cancel`
  return StartedJob{job.id(), job_dir.string(), supervisor, recorder};
}

}  // namespace solstice
