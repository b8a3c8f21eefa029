#pragma once
// Job events as JSON lines (protobuf JSON mapping, snake_case field names; bytes
// fields are base64, so console and output bytes round-trip exactly).
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// The version of the event format, written as "v" first in every event line.
inline constexpr uint32_t event_format_version = 1;

// One event as one line of JSON, without the trailing newline: "v" set to
// event_format_version, and every field of the event's kind printed, zero values
// too (a succeeded result has "exit_code": 0; 64-bit numbers are strings, as the
// protobuf JSON mapping has them). Invalid UTF-8 in string fields (which JSON
// cannot carry) is replaced by U+FFFD.
std::string event_to_json_line(const v1::JobEvent& event);
// Parses one event line; a line of a newer format version is refused. Lines
// written before "v" existed (no "v") are read as well.
Result<v1::JobEvent> event_from_json_line(std::string_view line);

// Any message as one line of JSON in the event format's style (field names as
// in the schema, zero values printed): result.json, the `jobs` commands.
std::string message_to_json(const google::protobuf::Message& message, bool pretty = false);

// Append-only event file: opened O_APPEND|O_CLOEXEC, mode 0600; every append is
// written through at once (no user-space buffering). Safe to share between threads.
// With max_bytes (events_max_bytes, runtime/job/disk_limits.hpp) the bulk of a job,
// its output and console events, stops at that size: the first one that would pass
// it is replaced by a notice saying so (with its sequence and time), later ones are
// left out; every other event (states, steps, errors, the result) is still written.
class EventLog {
 public:
  static Result<EventLog> open(const std::filesystem::path& path, uint64_t max_bytes = 0);

  EventLog(EventLog&& other) noexcept;
  EventLog& operator=(EventLog&& other) noexcept;
  EventLog(const EventLog&) = delete;
  EventLog& operator=(const EventLog&) = delete;
  ~EventLog();

  Result<void> append(const v1::JobEvent& event);
  const std::filesystem::path& path() const { return path_; }

 private:
  EventLog(int fd, std::filesystem::path path, uint64_t max_bytes, uint64_t size);
  void close_fd();
  Result<void> write_line(const std::string& line);

  int fd_ = -1;
  std::filesystem::path path_;
  std::unique_ptr<std::mutex> write_mutex_;
  uint64_t max_bytes_ = 0;  // 0: no bound
  uint64_t size_ = 0;       // of the file, as this log has written it
  bool truncated_ = false;
};

// Parses an event file back; empty lines are skipped; a bad line is an error
// naming the file and line number.
Result<std::vector<v1::JobEvent>> read_event_log(const std::filesystem::path& path);

}  // namespace solstice
