#pragma once
// Solstice Runner inside a larger CAF application: the one public header.
//
//   caf::actor_system_config cfg;          // the host's own config
//   solstice::add_runner_types(cfg);       // the runner's message types + errors
//   caf::actor_system sys{cfg};
//   auto job = solstice::start_job(sys, spec, config, my_event_sink);
//
// The host's event sink is any actor with the event_sink_actor interface
// (actors/actors.hpp); it receives every job event in order, the last one
// carrying the result. No global state, no CAF_MAIN, no assumptions about the
// host's scheduler or other actors.
#include "actors/actors.hpp"
#include "actors/runner_types.hpp"
#include "runtime/error.hpp"

namespace solstice {

struct StartedJob {
  std::string job_id;
  std::string job_dir;  // events.jsonl, console.log, result.json, artifacts/
  // Send cancel_atom to cancel; it quits after the result event.
  job_supervisor_actor supervisor;
  // The sink that keeps the job's record (it quits after the result event).
  event_sink_actor recorder;
};

// Validates `job` against `config` (clear errors, before any VM starts), gives it
// an id if it has none, makes its record directory and starts it: a job
// supervisor (with the runner's own VM actors) whose events go to `events` and to
// the job's record in the state directory.
Result<StartedJob> start_job(caf::actor_system& sys, v1::JobSpec job,
                             const v1::RunnerConfig& config, event_sink_actor events);

}  // namespace solstice
