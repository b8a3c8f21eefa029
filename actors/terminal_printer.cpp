#include "actors/terminal_printer.hpp"

#include <unistd.h>

#include <cstdio>

#include "runtime/event_log.hpp"

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

void line(printer_pointer self, const std::string& text) {
  auto& st = self->state;
  std::string out = st.at_line_start ? "" : "\n";
  out += text + "\n";
  write_all(STDOUT_FILENO, out);
  st.at_line_start = true;
}

std::string elapsed(printer_pointer self, int64_t timestamp_us) {
  auto& st = self->state;
  if (st.first_timestamp_us < 0)
    st.first_timestamp_us = timestamp_us;
  char buf[32];
  std::snprintf(buf, sizeof buf, "[%7.2fs]",
                static_cast<double>(timestamp_us - st.first_timestamp_us) / 1e6);
  return buf;
}

void print_human(printer_pointer self, const v1::JobEvent& event) {
  auto& st = self->state;
  auto at = elapsed(self, event.timestamp_us());
  switch (event.kind_case()) {
    case v1::JobEvent::kState: {
      auto text = at + " " + lower_name(v1::JobState_Name(event.state().state()));
      if (!event.state().detail().empty())
        text += " (" + event.state().detail() + ")";
      line(self, text);
      break;
    }
    case v1::JobEvent::kConsole:
      if (st.show_console)
        line(self, at + " console | " + event.console().line());
      break;
    case v1::JobEvent::kStepStarted:
      st.step_names[event.step_started().step_index()] = event.step_started().name();
      line(self, at + " ==> step " + std::to_string(event.step_started().step_index() + 1) +
                   "/" + std::to_string(st.step_count) + ": " + event.step_started().name());
      break;
    case v1::JobEvent::kOutput: {
      const auto& data = event.output().data();
      if (event.output().stream() == v1::STDERR) {
        write_all(STDERR_FILENO, data);
      } else {
        write_all(STDOUT_FILENO, data);
        if (!data.empty())
          st.at_line_start = data.back() == '\n';
      }
      break;
    }
    case v1::JobEvent::kStepFinished: {
      const auto& r = event.step_finished();
      line(self, at + " <== step '" + r.name() + "' " + outcome_text(r.outcome()) + " (exit " +
                   exit_text(r) + ") in " + seconds_text(r.duration_ms()));
      break;
    }
    case v1::JobEvent::kError:
      line(self, at + " error: " + event.error().message());
      break;
    case v1::JobEvent::kNotice:
      line(self, at + " note: " + event.notice().message());
      break;
    case v1::JobEvent::kResult:
      write_all(STDOUT_FILENO, (st.at_line_start ? "\n" : "\n\n") + format_summary(event.result()));
      st.at_line_start = true;
      break;
    default:
      break;
  }
}

}  // namespace

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
  if (!result.shutdown_method().empty())
    out += "  VM ended by: " + result.shutdown_method() + "\n";
  for (const auto& artifact : result.artifacts())
    out += "  artifact: " + artifact + "\n";
  if (!result.error().empty())
    out += "  error: " + result.error() + "\n";
  out += result.summary() + " (exit code " + std::to_string(result.exit_code()) + ")\n";
  return out;
}

event_sink_actor::behavior_type
terminal_printer(printer_pointer self, bool json, bool show_console, uint32_t step_count,
                 std::function<void(const v1::JobResult&)> on_result) {
  self->state.json = json;
  self->state.show_console = show_console;
  self->state.step_count = step_count;
  self->state.on_result = std::move(on_result);
  return {
    [=](event_atom, const v1::JobEvent& event) {
      if (self->state.json)
        write_all(STDOUT_FILENO, event_to_json_line(event) + "\n");
      else
        print_human(self, event);
      if (event.has_result()) {
        if (self->state.on_result)
          self->state.on_result(event.result());
        self->quit();
      }
    },
  };
}

}  // namespace solstice
