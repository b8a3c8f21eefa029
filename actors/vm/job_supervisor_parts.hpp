#pragma once
// What the two halves of the job supervisor share (job_supervisor.cpp: the
// lifecycle; job_steps.cpp: the work in the guest). Included by those two only.
#include <functional>
#include <string>

#include "actors/vm/job_supervisor.hpp"

namespace solstice::supervision {

using supervisor_pointer = job_supervisor_internal::stateful_pointer<job_supervisor_state>;

// ---- job_supervisor.cpp

// A message or reply that makes no sense in the current phase: logged, ignored.
void unexpected(supervisor_pointer self, const std::string& what);
// Phases in which the job's outcome is still open.
bool undecided(job_phase phase);
// Events to every sink, numbered and timestamped (secrets redacted where text).
void emit(supervisor_pointer self, v1::JobEvent event);
std::string redact_text(const job_supervisor_state& st, const std::string& text);
void set_state(supervisor_pointer self, v1::JobState state, const std::string& detail = {});
void notice(supervisor_pointer self, const std::string& message);
void error_event(supervisor_pointer self, const std::string& message);
// Phase timings for the result.
void begin_phase(supervisor_pointer self, const std::string& name);
void end_phase(supervisor_pointer self, const std::string& name);
std::string with_console_tail(const job_supervisor_state& st, const std::string& message);
// Decides the job's outcome (the first decision wins) and moves to shutdown.
void decide(supervisor_pointer self, v1::JobStatus status, const std::string& message);
void infrastructure_error(supervisor_pointer self, const std::string& message);
// An SSH operation failed: waits briefly for the attempt's report of a lost VM.
void shell_failure(supervisor_pointer self, const std::string& message);

// ---- job_supervisor.cpp: the boot

// Spawns a VM attempt for st.image (restored when it has restore_from).
void start_attempt(supervisor_pointer self);
// "restore" for a restored VM's start, else "boot_to_ssh" (phase timings).
std::string boot_phase_name(const job_supervisor_state& st);

// ---- job_start.cpp

// The job has its VM slot: cold boot, or restore from the image's template (found,
// or built first), then start_attempt.
void choose_start(supervisor_pointer self);
// A clone's attempt starts once it holds one of the host's start slots (polling,
// never blocking; job_start.cpp).
void start_when_free(supervisor_pointer self);
// The guest is ready: the start slot goes at the job's first output
// (start_done) or a second later, whichever comes first.
void start_nearly_done(supervisor_pointer self);
void start_done(supervisor_pointer self);
// A restore failed (`err`): the template is marked stale and a cold attempt
// follows. False when the attempt was no restore (the caller handles the error).
bool restore_failed(supervisor_pointer self, const caf::error& err);
// Ends the current attempt whole, then runs `next` (a new attempt).
void retire_attempt(supervisor_pointer self, std::function<void()> next);

// ---- job_steps.cpp

// The console is handed off: set-up, uploads, steps, artifacts, then decide.
void set_up_guest(supervisor_pointer self);
// Records a finished (or interrupted) step; in the steps phase, goes on.
void step_finished(supervisor_pointer self, unsigned index, v1::StepResult result);
// A chunk of the running step's output, from the SSH executor.
void on_output(supervisor_pointer self, const v1::OutputChunk& chunk);

}  // namespace solstice::supervision
