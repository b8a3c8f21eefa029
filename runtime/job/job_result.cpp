#include "runtime/job/job_result.hpp"

#include <cctype>

#include "runtime/base/clock.hpp"

#include "runtime/base/clock.hpp"

namespace solstice {

int exit_code_for(v1::JobStatus status, int failing_step_code) {
  switch (status) {
    case v1::SUCCEEDED: return 0;
    case v1::FAILED: return failing_step_code != 0 ? failing_step_code : 1;
    case v1::TIMED_OUT: return exit_timed_out;
    case v1::CANCELLED: return exit_cancelled;
    case v1::INVALID_INPUT: return exit_invalid_input;
    default: return exit_infrastructure_error;
  }
}

int exit_code_for(const v1::JobResult& result) {
  return exit_code_for(result.status(), result.exit_code());
}

int failing_step_code(const v1::JobResult& result) {
  for (const auto& step : result.steps())
    if (step.outcome() == v1::STEP_FAILED)
      return step.exit_code();
  return 0;
}

std::string step_failure_reason(const std::string& step_name, const v1::StepResult& step) {
  return "step '" + step_name + "' failed with " +
         (step.exit_signal().empty()
            ? "exit code " + std::to_string(step.exit_code())
            : "signal " + step.exit_signal() + " (exit code " + std::to_string(step.exit_code()) +
                ")");
}

void add_skipped_steps(const v1::JobSpec& job, v1::JobResult& result) {
  for (int i = result.steps_size(); i < job.steps_size(); ++i) {
    auto* step = result.add_steps();
    step->set_step_index(static_cast<uint32_t>(i));
    step->set_name(job.steps(i).name());
    step->set_outcome(v1::STEP_SKIPPED);
  }
}

std::string summary_of(const v1::JobSpec& job, const v1::JobResult& result) {
  std::string status = v1::JobStatus_Name(result.status());
  for (auto& c : status)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  int ran = 0, failed = 0, skipped = 0;
  for (const auto& step : result.steps()) {
    if (step.outcome() == v1::STEP_SKIPPED)
      ++skipped;
    else
      ++ran;
    if (step.outcome() == v1::STEP_FAILED || step.outcome() == v1::STEP_TIMED_OUT)
      ++failed;
  }
  auto text = "job " + job.id() + " " + status + ": " + std::to_string(ran) + " of " +
              std::to_string(job.steps_size()) + " steps ran";
  if (failed)
    text += ", " + std::to_string(failed) + " failed";
  if (skipped)
    text += ", " + std::to_string(skipped) + " skipped";
  if (!result.error().empty())
    text += " — " + result.error().substr(0, result.error().find('\n'));
  return text;
}

void complete_result(const v1::JobSpec& job, v1::JobStatus status, const std::string& error,
                     const std::string& shutdown_method,
                     const std::deque<std::string>& console_tail, v1::JobResult& result) {
  add_skipped_steps(job, result);
  result.set_job_id(job.id());
  result.set_status(status);
  result.set_exit_code(exit_code_for(status, failing_step_code(result)));
  for (const auto& step : result.steps())
    if (step.outcome() == v1::STEP_FAILED && !step.exit_signal().empty()) {
      result.set_exit_signal(step.exit_signal());
      break;
    }
  result.set_error(error);
  result.set_shutdown_method(shutdown_method);
  result.clear_console_tail();
  for (const auto& line : console_tail)
    result.add_console_tail(line);
  result.set_summary(summary_of(job, result));
  result.set_ended_at_us(unix_now_us());
}

v1::JobEvent stand_in_result(const std::string& job_id, uint64_t sequence, v1::JobStatus status,
                             const std::string& error, const std::string& summary) {
  v1::JobEvent event;
  event.set_job_id(job_id);
  event.set_sequence(sequence);
  event.set_timestamp_us(unix_now_us());
  auto* result = event.mutable_result();
  result->set_job_id(job_id);
  result->set_status(status);
  result->set_exit_code(exit_code_for(status, 0));
  result->set_error(error);
  if (!summary.empty()) {
    result->set_summary(summary);
  } else {
    std::string words = v1::JobStatus_Name(status);
    for (auto& c : words)
      c = static_cast<char>(c == '_' ? ' ' : std::tolower(static_cast<unsigned char>(c)));
    result->set_summary("job " + job_id + " " + words + " — " + error.substr(0, error.find('\n')));
  }
  return event;
}

void rename_retired_kvm_phases(v1::JobResult& result) {
  for (auto& phase : *result.mutable_phases()) {
    if (phase.phase().rfind("kvm:", 0) == 0)
      continue;
    if (phase.phase() == "boot_to_ssh")
      phase.set_phase("boot");
    phase.set_phase("kvm:" + phase.phase());
  }
}

}  // namespace solstice
