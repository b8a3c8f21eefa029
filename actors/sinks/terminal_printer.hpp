#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "actors/actors.hpp"

namespace solstice {

// A partial output line longer than this is printed as a line of its own, so a
// job that never ends its lines cannot make the printer hold unbounded memory.
inline constexpr size_t max_held_line_bytes = 64 * 1024;

// One job as the printer shows it.
struct printed_job {
  std::string job_id;
  // Put in front of every line of this job ("[build] "); empty for a lone job,
  // whose output then goes to the terminal byte for byte.
  std::string prefix;
  uint32_t step_count = 0;
  // What the printer learns while the job runs.
  int64_t first_timestamp_us = -1;
  std::map<uint32_t, std::string> step_names;
  // Without a prefix: whether the last byte written ended a line.
  bool at_line_start = true;
  // With a prefix: output not yet ended by a newline, held per stream.
  std::string held_stdout, held_stderr;
  bool has_result = false;
  // Whether the printer waits for this job's result before it quits.
  bool awaited = true;
};

struct terminal_printer_state {
  static inline const char* name = "terminal_printer";
  terminal_printer_state() = default;
  bool json = false;
  bool show_console = false;
  std::function<void(const v1::JobResult&)> on_result;
  // By job id; a lone job without an id takes every event (its id is learnt late).
  std::vector<printed_job> jobs;
};

// An event sink that shows a job on the terminal: boot progress by phase with the
// elapsed time, step output live (stdout to stdout, stderr to stderr), then a
// summary table; or, with `json`, every event as one JSON line. Calls `on_result`
// with the result, then quits. Spawn it detached (it writes to the terminal).
event_sink_actor::behavior_type
terminal_printer(event_sink_actor::stateful_pointer<terminal_printer_state> self, bool json,
                 bool show_console, uint32_t step_count,
                 std::function<void(const v1::JobResult&)> on_result);

// The same for several jobs at once, told apart by their events' job_id: each
// job's lines carry its prefix and are written whole, so concurrent jobs never
// mix within a line (output without a newline is held until it comes, or until
// it exceeds max_held_line_bytes). Calls `on_result` for each job's result and
// quits once every job has one. Spawn it detached.
event_sink_actor::behavior_type
jobs_terminal_printer(event_sink_actor::stateful_pointer<terminal_printer_state> self, bool json,
                      bool show_console, std::vector<printed_job> jobs,
                      std::function<void(const v1::JobResult&)> on_result);

// "<== step 'build' succeeded (exit 0) in 1.20s": a finished step, as shown live
// and by `jobs logs`.
std::string step_finished_text(const v1::StepResult& step);

// The summary table printed at the end of a run.
std::string format_summary(const v1::JobResult& result);

// Puts `prefix` in front of every line of `text`, which ends with a newline.
std::string prefix_lines(const std::string& prefix, const std::string& text);

}  // namespace solstice
