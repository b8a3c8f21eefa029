#pragma once
// Solstice Runner inside a larger CAF application: the one public header.
//
//   caf::actor_system_config cfg;          // the host's own config
//   solstice::add_runner_types(cfg);       // the runner's message types + errors
//   caf::actor_system sys{cfg};
//   solstice::recover_abandoned_jobs_at_start(config);  // once, at the host's start
//   auto job = solstice::start_job(sys, spec, config, my_event_sink);
//
// The host's event sink is any actor with the event_sink_actor interface
// (actors/actors.hpp); it receives every job event in order, the last one
// carrying the result. No global state, no CAF_MAIN, no assumptions about the
// host's scheduler or other actors.
//
// Crash recovery is the host's call, made once when it starts: if a previous run
// of the host (or any runner sharing its state directory) died with VMs running,
// recover_abandoned_jobs_at_start() kills the QEMUs that outlived it, removes their
// work files and records their jobs as infrastructure_error, exactly as
// `solstice-runner run` and `solstice-runner node` do when they start. start_job
// never does this by itself: only the host knows when it starts, and recovery may
// kill processes and block for seconds, which a call that starts one job (often
// from inside an actor) should not do behind the host's back.
//
// Memory over many jobs: each job runs on threads of its own (the VM's actors,
// the SSH worker, wake-up threads), and glibc gives threads their own malloc
// arenas, up to 8 per core. Every arena keeps some pages, so a host's RSS climbs
// for its first dozen jobs (measured +9-13 %) before it levels off. A host that
// runs many jobs should call limit_malloc_arenas() once at its start, as the
// `solstice-runner` process does (RSS then stays flat, +0.5 % over 12 jobs). It
// is process-wide, so it is the host's call, not start_job's.
#include <memory>
#include <vector>

#include "actors/actors.hpp"
#include "actors/runner_types.hpp"
#include "runtime/base/error.hpp"
#include "runtime/vm/job_claim.hpp"
#include "runtime/vm/recovery.hpp"

namespace solstice {

struct StartedJob {
  std::string job_id;
  std::string job_dir;  // events.jsonl, console.log, result.json, artifacts/
  // Send cancel_atom to cancel; it quits after the result event.
  job_supervisor_actor supervisor;
  // The sink that keeps the job's record (it quits after the result event).
  event_sink_actor recorder;
};

// Cleans what runners that died left in config.state_dir (see runtime/vm/recovery.hpp):
// call it once when the host starts, before its first start_job, for each state
// directory it uses. Jobs of runners still alive (this process included) are left
// alone, so calling it again is harmless. It blocks (up to a few seconds for each
// QEMU it has to kill): call it from main or another thread of the host's own, not
// from an actor. Returns one entry per job it found, each with a description to
// show or log; the error case is a state directory it cannot read.
Result<std::vector<RecoveredJob>> recover_abandoned_jobs_at_start(const v1::RunnerConfig& config);

// Caps glibc's malloc arenas at two (unless MALLOC_ARENA_MAX is set: that wins).
void limit_malloc_arenas();

// Validates `job` against `config` (clear errors, before any VM starts), gives it
// an id if it has none, makes its record directory and starts it: a job
// supervisor (with the runner's own VM actors) whose events go to `events` and to
// the job's record in the state directory. The record names this process as the
// job's runner (owner.json), and a `solstice-runner jobs cancel` from another
// process cancels the job (see actors/host/job_control.hpp). Validation asks
// `qemu-img info` about the job's disk image, so the call takes a few
// milliseconds (at most 10 s).
//
// The job's id is claimed first (runtime/vm/job_claim.hpp): an id in use by a
// running job, or with a record already, is refused and nothing is touched.
Result<StartedJob> start_job(caf::actor_system& sys, v1::JobSpec job,
                             const v1::RunnerConfig& config, event_sink_actor events);

// The same with the job's id claimed already (JobClaim::take, e.g. with `replace`),
// as the `run` command does so that it can refuse before any job starts. The claim
// is held until the job's supervisor and recorder are gone; when the job cannot
// start, its record is removed again.
Result<StartedJob> start_job(caf::actor_system& sys, v1::JobSpec job,
                             const v1::RunnerConfig& config, event_sink_actor events,
                             std::shared_ptr<JobClaim> claim);

}  // namespace solstice
