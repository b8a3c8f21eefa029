#include "actors/sinks/terminal_printer.hpp"

#include <unistd.h>

#include <cstdio>

#include "runtime/job/event_log.hpp"

namespace solstice {

namespace {

using printer_pointer = event_sink_actor::stateful_pointer<terminal_printer_state>;

void write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    auto n = ::write(fd, data.data() + done, data.size() - done);
    if (n <= 0)
      return;  // the terminal went away; the job record still has everything
    done += static_cast<size_t>(n);
  }
}

std::string lower_name(std::string name) {
  for (auto& c : name)
    c = static_cast<char>(c == '_' ? ' ' : std::tolower(static_cast<unsigned char>(c)));
  return name;
}

std::string seconds_text(int64_t ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2fs", static_cast<double>(ms) / 1000.0);
  return buf;
}

std::string outcome_text(v1::StepOutcome outcome) {
  switch (outcome) {
    case v1::STEP_SUCCEEDED: return "succeeded";
    case v1::STEP_FAILED: return "failed";
    case v1::STEP_ALLOWED_FAILURE: return "failed (allowed)";
    case v1::STEP_TIMED_OUT: return "timed out";
    case v1::STEP_SKIPPED: return "skipped";
    case v1::STEP_CANCELLED: return "cancelled";
    default: return "?";
  }
}

std::string exit_text(const v1::StepResult& step) {
  if (step.outcome() == v1::STEP_SKIPPED)
    return "-";
  if (!step.exit_signal().empty())
    return std::to_string(step.exit_code()) + " (SIG" + step.exit_signal() + ")";
  return std::to_string(step.exit_code());
}

// The printer's view of the job an event belongs to. A lone job without an id
// takes every event; an event of a job nobody announced is shown under its id.
printed_job& job_of(printer_pointer self, const v1::JobEvent& event) {
  auto& jobs = self->state.jobs;
  if (jobs.size() == 1 && jobs.front().job_id.empty())
    return jobs.front();
  for (auto& job : jobs)
    if (job.job_id == event.job_id())
      return job;
  printed_job stranger;
  stranger.job_id = event.job_id();
  stranger.prefix = "[" + event.job_id() + "] ";
  stranger.awaited = false;
  jobs.push_back(std::move(stranger));
  return jobs.back();
}

// Output of `job` still held back for want of a newline goes out as a line of
// its own (a status line or the job's end follows).
void flush_held(printed_job& job) {
  if (!job.held_stderr.empty()) {
    write_all(STDERR_FILENO, job.prefix + job.held_stderr + "\n");
    job.held_stderr.clear();
  }
  if (!job.held_stdout.empty()) {
    write_all(STDOUT_FILENO, job.prefix + job.held_stdout + "\n");
    job.held_stdout.clear();
  }
}

// Every line that `data` completes, each behind `prefix`; what is left without
// a newline stays in `held`, cut into lines once it exceeds max_held_line_bytes.
std::string whole_lines(const std::string& prefix, std::string& held, const std::string& data) {
  std::string out;
  size_t start = 0;
  while (start < data.size()) {
    auto end = data.find('\n', start);
    if (end == std::string::npos) {
      held.append(data, start, std::string::npos);
      break;
    }
    out += prefix;
    out += held;
    held.clear();
    out.append(data, start, end + 1 - start);
    start = end + 1;
  }
  size_t cut = 0;
  while (held.size() - cut > max_held_line_bytes) {
    out += prefix;
    out.append(held, cut, max_held_line_bytes);
    out += '\n';
    cut += max_held_line_bytes;
  }
  held.erase(0, cut);
  return out;
}

void line(printed_job& job, const std::string& text) {
  if (!job.prefix.empty()) {
    flush_held(job);
    write_all(STDOUT_FILENO, job.prefix + text + "\n");
    return;
  }
  std::string out = job.at_line_start ? "" : "\n";
  out += text + "\n";
  write_all(STDOUT_FILENO, out);
  job.at_line_start = true;
}

std::string elapsed(printed_job& job, int64_t timestamp_us) {
  if (job.first_timestamp_us < 0)
    job.first_timestamp_us = timestamp_us;
  char buf[32];
  std::snprintf(buf, sizeof buf, "[%7.2fs]",
                static_cast<double>(timestamp_us - job.first_timestamp_us) / 1e6);
  return buf;
}

void print_output(printed_job& job, const v1::OutputChunk& output) {
  const auto& data = output.data();
  const bool is_stderr = output.stream() == v1::STDERR;
  if (!job.prefix.empty()) {
    auto out = whole_lines(job.prefix, is_stderr ? job.held_stderr : job.held_stdout, data);
    if (!out.empty())
      write_all(is_stderr ? STDERR_FILENO : STDOUT_FILENO, out);
    return;
  }
  if (is_stderr) {
    write_all(STDERR_FILENO, data);
  } else {
    write_all(STDOUT_FILENO, data);
    if (!data.empty())
      job.at_line_start = data.back() == '\n';
  }
}

void print_human(printer_pointer self, printed_job& job, const v1::JobEvent& event) {
  auto at = elapsed(job, event.timestamp_us());
  switch (event.kind_case()) {
    case v1::JobEvent::kState: {
      auto text = at + " " + lower_name(v1::JobState_Name(event.state().state()));
      if (!event.state().detail().empty())
        text += " (" + event.state().detail() + ")";
      line(job, text);
      break;
    }
    case v1::JobEvent::kConsole:
      if (self->state.show_console)
        line(job, at + " console | " + event.console().line());
      break;
    case v1::JobEvent::kStepStarted:
      job.step_names[event.step_started().step_index()] = event.step_started().name();
      line(job, at + " ==> step " + std::to_string(event.step_started().step_index() + 1) +
                  "/" + std::to_string(job.step_count) + ": " + event.step_started().name());
      break;
    case v1::JobEvent::kOutput:
      print_output(job, event.output());
      break;
    case v1::JobEvent::kStepFinished:
      line(job, at + " " + step_finished_text(event.step_finished()));
      break;
    case v1::JobEvent::kError:
      line(job, at + " error: " + event.error().message());
      break;
    case v1::JobEvent::kNotice:
      line(job, at + " note: " + event.notice().message());
      break;
    case v1::JobEvent::kResult:
      if (!job.prefix.empty()) {
        flush_held(job);
        write_all(STDOUT_FILENO, prefix_lines(job.prefix, format_summary(event.result())));
      } else {
        write_all(STDOUT_FILENO,
                  (job.at_line_start ? "\n" : "\n\n") + format_summary(event.result()));
        job.at_line_start = true;
      }
      break;
    default:
      break;
  }
}

event_sink_actor::behavior_type printer_behavior(printer_pointer self) {
  return {
    [=](event_atom, const v1::JobEvent& event) {
      // A repeat (no payload) asks again for the acknowledgement of an event shown
      // already (coordinator.hpp: repeat_of): answering it is all there is to do.
      if (event.kind_case() == v1::JobEvent::KIND_NOT_SET)
        return;
      auto& job = job_of(self, event);
      // A job has one result; anything after it (a late stand-in for a killed
      // job whose own result came first) is not shown.
      if (job.has_result)
        return;
      if (self->state.json)
        write_all(STDOUT_FILENO, event_to_json_line(event) + "\n");
      else
        print_human(self, job, event);
      if (!event.has_result())
        return;
      job.has_result = true;
      if (self->state.on_result)
        self->state.on_result(event.result());
      for (const auto& other : self->state.jobs)
        if (other.awaited && !other.has_result)
          return;
      self->quit();
    },
  };
}

}  // namespace

std::string step_finished_text(const v1::StepResult& r) {
  return "<== step '" + r.name() + "' " + outcome_text(r.outcome()) + " (exit " + exit_text(r) +
         ") in " + seconds_text(r.duration_ms());
}

std::string format_summary(const v1::JobResult& result) {
  std::string out;
  char buf[512];
  std::snprintf(buf, sizeof buf, "  %-3s %-28s %-17s %-12s %s\n", "#", "STEP", "RESULT", "EXIT",
                "TIME");
  out += buf;
  for (const auto& step : result.steps()) {
    auto name = step.name().size() > 28 ? step.name().substr(0, 25) + "..." : step.name();
    std::snprintf(buf, sizeof buf, "  %-3u %-28s %-17s %-12s %s\n", step.step_index() + 1,
                  name.c_str(), outcome_text(step.outcome()).c_str(), exit_text(step).c_str(),
                  step.outcome() == v1::STEP_SKIPPED ? "-"
                                                     : seconds_text(step.duration_ms()).c_str());
    out += buf;
  }
  std::string phases;
  for (const auto& phase : result.phases())
    if (phase.phase().rfind("step:", 0) != 0)
      phases += (phases.empty() ? "" : ", ") + phase.phase() + " " +
                seconds_text(phase.duration_ms());
  if (!phases.empty())
    out += "  phases: " + phases + "\n";
  if (!result.start().empty())
    out += "  start: " + result.start() +
           (result.start_note().empty() ? "" : " (" + result.start_note() + ")") + "\n";
  if (!result.shutdown_method().empty())
    out += "  VM ended by: " + result.shutdown_method() + "\n";
  for (const auto& artifact : result.artifacts())
    out += "  artifact: " + artifact + "\n";
  if (!result.error().empty())
    out += "  error: " + result.error() + "\n";
  out += result.summary() + " (exit code " + std::to_string(result.exit_code()) + ")\n";
  return out;
}

std::string prefix_lines(const std::string& prefix, const std::string& text) {
  std::string out;
  size_t start = 0;
  while (start < text.size()) {
    auto end = text.find('\n', start);
    end = end == std::string::npos ? text.size() : end + 1;
    out += prefix;
    out.append(text, start, end - start);
    start = end;
  }
  if (!out.empty() && out.back() != '\n')
    out += '\n';
  return out;
}

event_sink_actor::behavior_type
terminal_printer(printer_pointer self, bool json, bool show_console, uint32_t step_count,
                 std::function<void(const v1::JobResult&)> on_result) {
  printed_job lone;
  lone.step_count = step_count;
  return jobs_terminal_printer(self, json, show_console, {std::move(lone)}, std::move(on_result));
}

event_sink_actor::behavior_type
jobs_terminal_printer(printer_pointer self, bool json, bool show_console,
                      std::vector<printed_job> jobs,
                      std::function<void(const v1::JobResult&)> on_result) {
  self->state.json = json;
  self->state.show_console = show_console;
  self->state.jobs = std::move(jobs);
  self->state.on_result = std::move(on_result);
  return printer_behavior(self);
}

}  // namespace solstice
