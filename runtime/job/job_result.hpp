#pragma once
// A job's result, built by plain functions: the one exit-code table of the whole
// program, the summary line, the steps a job never reached, and the phase names
// a retired boot attempt keeps. The job supervisor decides; these only compute.
#include <deque>
#include <string>

#include "solstice.pb.h"

namespace solstice {

// Exit codes of the runner's commands besides a job's own (0, step code, 128+N).
inline constexpr int exit_invalid_input = 2;
inline constexpr int exit_timed_out = 124;
inline constexpr int exit_infrastructure_error = 125;
inline constexpr int exit_cancelled = 130;

// The exit code for a job that ended with `status`; for FAILED it is the exit code
// of the failing step (`failing_step_code`, 1 when that is 0 or unknown).
int exit_code_for(v1::JobStatus status, int failing_step_code);

// The exit code for a finished result (its status, and its own exit code for FAILED).
int exit_code_for(const v1::JobResult& result);

// The exit code of the first step that failed (0 when none did).
int failing_step_code(const v1::JobResult& result);

// "step 'build' failed with exit code 2" / "... with signal KILL (exit code 137)".
std::string step_failure_reason(const std::string& step_name, const v1::StepResult& step);

// Adds a SKIPPED entry for every step of `job` that `result` has no entry for.
void add_skipped_steps(const v1::JobSpec& job, v1::JobResult& result);

// "job ID succeeded: 3 of 3 steps ran" (+ failed / skipped counts, + the first
// line of `error`).
std::string summary_of(const v1::JobSpec& job, const v1::JobResult& result);

// Everything the result says at the end, from what the job decided: status,
// error, how the VM ended and the console's last lines. Fills in the skipped
// steps, the exit code and signal, the summary and the end time (started_at_us
// is the supervisor's, set when the job starts).
void complete_result(const v1::JobSpec& job, v1::JobStatus status, const std::string& error,
                     const std::string& shutdown_method,
                     const std::deque<std::string>& console_tail, v1::JobResult& result);

// The result event that stands in for a job that could not report its own (its
// node is gone, it was refused or cancelled while queued, killed by a second
// interrupt): status, exit code from the table, error and a summary line
// ("job ID cancelled — why" when `summary` is empty).
v1::JobEvent stand_in_result(const std::string& job_id, uint64_t sequence, v1::JobStatus status,
                             const std::string& error, const std::string& summary = {});

// After a KVM attempt was retired, its phases keep their time under their own
// names so the result lists each phase once: kvm:prepare, kvm:boot, then the
// TCG attempt's.
void rename_retired_kvm_phases(v1::JobResult& result);

}  // namespace solstice
