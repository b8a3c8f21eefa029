#pragma once
// The actor-system host of a local run: makes the actor system, the job
// supervisor and the event sinks (job directory recorder, terminal printer), turns
// Ctrl-C into cancel (and a second one into kill), and returns the exit code.
// Light header on purpose: no CAF templates here.
#include <filesystem>
#include <string>

#include "solstice.pb.h"

namespace solstice {

struct LocalRunOptions {
  bool json = false;          // every event as one JSON line instead of the human view
  bool show_console = false;  // print the guest's console lines during boot
};

// Exit codes of `solstice-runner run` besides the job's own (0, step code, 128+N).
inline constexpr int exit_invalid_input = 2;
inline constexpr int exit_timed_out = 124;
inline constexpr int exit_infrastructure_error = 125;
inline constexpr int exit_cancelled = 130;

// A new job id: UTC time plus random hex, e.g. 20261127-211503-9f3a1c.
std::string make_job_id();

// Runs one validated job to its end.
int run_job_locally(v1::JobSpec job, const v1::RunnerConfig& config,
                    const LocalRunOptions& options);

}  // namespace solstice
