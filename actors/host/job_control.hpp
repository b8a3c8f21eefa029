#pragma once
// Control of a running job from another local process (`solstice-runner jobs
// cancel`): the other process leaves a cancel request in the job's record
// (runtime/job/job_records.hpp) and this watcher, one per job, passes it on to the
// job's supervisor.
//
// Why a file polled every 250 ms rather than a signal or a FIFO: a runner process
// may run many jobs at once, and a signal cannot say which one; a FIFO needs a
// blocked reader per job and is lost when nobody reads. A file in the job's own
// record (mode 0700 directory: only the runner's user may ask) names the job, waits
// until it is seen, and costs one unlink() attempt per job every 250 ms.
#include <filesystem>

#include <caf/fwd.hpp>

#include "actors/actors.hpp"

namespace solstice {

// Watches `job_dir` for cancel requests while `supervisor` lives: each one is
// removed and becomes a `cancel` to the supervisor (a second one, like a second
// Ctrl-C, ends a VM that is slow to power down).
void watch_cancel_requests(caf::actor_system& sys, job_supervisor_actor supervisor,
                           std::filesystem::path job_dir);

}  // namespace solstice
