#pragma once
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "actors/actors.hpp"

namespace solstice {

struct terminal_printer_state {
  static inline const char* name = "terminal_printer";
  terminal_printer_state() = default;
  bool json = false;
  bool show_console = false;
  int64_t first_timestamp_us = -1;
  std::function<void(const v1::JobResult&)> on_result;
  std::map<uint32_t, std::string> step_names;
  uint32_t step_count = 0;
  // Whether the last byte written to the terminal ended a line.
  bool at_line_start = true;
};

// An event sink that shows a job on the terminal: boot progress by phase with the
// elapsed time, step output live (stdout to stdout, stderr to stderr), then a
// summary table; or, with `json`, every event as one JSON line. Calls `on_result`
// with the result, then quits. Spawn it detached (it writes to the terminal).
event_sink_actor::behavior_type
terminal_printer(event_sink_actor::stateful_pointer<terminal_printer_state> self, bool json,
                 bool show_console, uint32_t step_count,
                 std::function<void(const v1::JobResult&)> on_result);

// The summary table printed at the end of a run.
std::string format_summary(const v1::JobResult& result);

}  // namespace solstice
