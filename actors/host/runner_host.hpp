#pragma once
// The actor-system host of a local run: makes the actor system, a job supervisor
// per job and the event sinks (job directory recorders, one terminal printer),
// turns Ctrl-C into cancel (and a second one into kill), and returns the exit code.
// Light header on purpose: no CAF templates here.
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"
#include "runtime/job/job_result.hpp"
#include "solstice.pb.h"

namespace solstice {

struct LocalRunOptions {
  bool json = false;          // every event as one JSON line instead of the human view
  bool show_console = false;  // print the guest's console lines during boot
  // A job whose id has a finished record replaces it (the old record is removed
  // first); without it such a job is refused. A running job's id is always refused.
  bool replace = false;
};

// Exit codes (the one table of the program) and exit_code_for(result) are in
// runtime/job/job_result.hpp.

// The configuration read when no --config is given and it exists:
// /etc/solstice-runner/config.json (the install's sysconfdir).
const char* default_config_file();

// The runner configuration a command works with: defaults, then `config_file`
// (or default_config_file() when `config_file` is empty and that exists),
// then the command line (`state_dir`, `accel`); the built test guest is known as
// `solstice-test-guest` unless the file says otherwise.
Result<v1::RunnerConfig> load_effective_config(const std::string& config_file,
                                               const std::string& state_dir,
                                               const std::string& accel);

// Runs one validated job to its end.
int run_job_locally(v1::JobSpec job, const v1::RunnerConfig& config,
                    const LocalRunOptions& options);

// Runs validated jobs to their end, all at once in one actor system (each takes a
// VM slot as max_concurrent_vms allows, and says so while it waits). One job is
// shown exactly as run_job_locally shows it. Several: each line of the human view
// carries the job's name (or id) as "[name] ", each job's summary comes when it
// ends, then one line per job. Returns 0 when every job succeeded, else the exit
// code of the first job (in the given order) that did not.
int run_jobs_locally(std::vector<v1::JobSpec> jobs, const v1::RunnerConfig& config,
                     const LocalRunOptions& options);

}  // namespace solstice
