#include "runtime/job/event_log.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <utility>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/reflection.h>
#include <google/protobuf/util/json_util.h>

namespace solstice {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

// Length of the valid UTF-8 sequence starting at text[i], or 0 if none starts there.
std::size_t utf8_sequence_length(std::string_view text, std::size_t i) {
  const auto byte = [&](std::size_t at) { return static_cast<unsigned char>(text[at]); };
  const auto continuation = [&](std::size_t at, unsigned char low = 0x80, unsigned char high = 0xBF) {
    return at < text.size() && byte(at) >= low && byte(at) <= high;
  };
  const unsigned char lead = byte(i);
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return continuation(i + 1) ? 2 : 0;
  if (lead >= 0xE0 && lead <= 0xEF) {
    const unsigned char low = lead == 0xE0 ? 0xA0 : 0x80;   // no overlong forms
    const unsigned char high = lead == 0xED ? 0x9F : 0xBF;  // no surrogates
    return continuation(i + 1, low, high) && continuation(i + 2) ? 3 : 0;
  }
  if (lead >= 0xF0 && lead <= 0xF4) {
    const unsigned char low = lead == 0xF0 ? 0x90 : 0x80;
    const unsigned char high = lead == 0xF4 ? 0x8F : 0xBF;  // nothing above U+10FFFF
    return continuation(i + 1, low, high) && continuation(i + 2) && continuation(i + 3) ? 4 : 0;
  }
  return 0;
}

bool is_valid_utf8(std::string_view text) {
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_sequence_length(text, i);
    if (length == 0) return false;
    i += length;
  }
  return true;
}

std::string replace_invalid_utf8(std::string_view text) {
  std::string fixed;
  fixed.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t length = utf8_sequence_length(text, i);
    if (length == 0) {
      fixed += "\xEF\xBF\xBD";  // U+FFFD
      ++i;
    } else {
      fixed.append(text, i, length);
      i += length;
    }
  }
  return fixed;
}

// Whether any string field (bytes fields are fine) holds invalid UTF-8.
bool has_invalid_strings(const Message& message) {
  const auto* reflection = message.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  reflection->ListFields(message, &fields);
  for (const auto* field : fields) {
    const bool repeated = field->is_repeated();
    const int count = repeated ? reflection->FieldSize(message, field) : 1;
    for (int i = 0; i < count; ++i) {
      if (field->type() == FieldDescriptor::TYPE_STRING) {
        std::string scratch;
        const std::string& value = repeated ? reflection->GetRepeatedStringReference(message, field, i, &scratch)
                                            : reflection->GetStringReference(message, field, &scratch);
        if (!is_valid_utf8(value)) return true;
      } else if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        const Message& inner = repeated ? reflection->GetRepeatedMessage(message, field, i)
                                        : reflection->GetMessage(message, field);
        if (has_invalid_strings(inner)) return true;
      }
    }
  }
  return false;
}

void repair_strings(Message& message) {
  const auto* reflection = message.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  reflection->ListFields(message, &fields);
  for (const auto* field : fields) {
    const bool repeated = field->is_repeated();
    const int count = repeated ? reflection->FieldSize(message, field) : 1;
    for (int i = 0; i < count; ++i) {
      if (field->type() == FieldDescriptor::TYPE_STRING) {
        if (repeated) {
          reflection->SetRepeatedString(&message, field, i,
                                        replace_invalid_utf8(reflection->GetRepeatedString(message, field, i)));
        } else {
          reflection->SetString(&message, field, replace_invalid_utf8(reflection->GetString(message, field)));
        }
      } else if (field->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
        repair_strings(repeated ? *reflection->MutableRepeatedMessage(&message, field, i)
                                : *reflection->MutableMessage(&message, field));
      }
    }
  }
}

std::string status_text(const google::protobuf::util::Status& status) {
  std::string text(status.message());
  return text.empty() ? status.ToString() : text;
}

google::protobuf::util::JsonPrintOptions print_options(bool pretty) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = pretty;
  options.preserve_proto_field_names = true;
  // Integrators must not have to know proto3's defaults: exit_code 0 is printed.
  options.always_print_primitive_fields = true;
  return options;
}

}  // namespace

std::string message_to_json(const google::protobuf::Message& message, bool pretty) {
  std::string json;
  (void)google::protobuf::util::MessageToJsonString(message, &json, print_options(pretty));
  return json;
}

std::string event_to_json_line(const v1::JobEvent& event) {
  const auto options = print_options(false);
  // JSON strings cannot carry invalid UTF-8 (protobuf would drop the bytes and
  // complain on stderr); such text is repaired on a copy, as is an event that
  // does not carry the format version yet.
  const v1::JobEvent* printable = &event;
  v1::JobEvent copy;
  const bool invalid = has_invalid_strings(event);
  if (invalid || event.v() != event_format_version) {
    copy = event;
    if (invalid)
      repair_strings(copy);
    copy.set_v(event_format_version);
    printable = &copy;
  }
  std::string line;
  const auto status = google::protobuf::util::MessageToJsonString(*printable, &line, options);
  if (!status.ok()) {
    v1::JobEvent replacement;
    replacement.set_v(event_format_version);
    replacement.set_job_id(replace_invalid_utf8(event.job_id()));
    replacement.set_sequence(event.sequence());
    replacement.set_timestamp_us(event.timestamp_us());
    replacement.mutable_error()->set_message("event could not be written as JSON: " + status_text(status));
    line.clear();
    (void)google::protobuf::util::MessageToJsonString(replacement, &line, options);
  }
  return line;
}

Result<v1::JobEvent> event_from_json_line(std::string_view line) {
  v1::JobEvent event;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(line.data(), line.size()), &event, options);
  if (!status.ok()) return fail("not a job event: " + status_text(status));
  if (event.v() > event_format_version)
    return fail("event format version " + std::to_string(event.v()) + " is newer than this runner reads (" +
                std::to_string(event_format_version) + ")");
  return event;
}

EventLog::EventLog(int fd, std::filesystem::path path, uint64_t max_bytes, uint64_t size)
    : fd_(fd), path_(std::move(path)), write_mutex_(std::make_unique<std::mutex>()),
      max_bytes_(max_bytes), size_(size) {}

EventLog::EventLog(EventLog&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), path_(std::move(other.path_)),
      write_mutex_(std::move(other.write_mutex_)), max_bytes_(other.max_bytes_),
      size_(other.size_), truncated_(other.truncated_) {}

EventLog& EventLog::operator=(EventLog&& other) noexcept {
  if (this != &other) {
    close_fd();
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    write_mutex_ = std::move(other.write_mutex_);
    max_bytes_ = other.max_bytes_;
    size_ = other.size_;
    truncated_ = other.truncated_;
  }
  return *this;
}

EventLog::~EventLog() { close_fd(); }

void EventLog::close_fd() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Result<EventLog> EventLog::open(const std::filesystem::path& path, uint64_t max_bytes) {
  // O_NONBLOCK only matters for a FIFO without a reader, which must not block us.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NONBLOCK, 0600);
  if (fd < 0) return fail(errno_message("event log " + path.string() + ": cannot open", errno));
  // The file may have existed with a wider mode; events can carry guest output.
  struct stat info {};
  if (::fchmod(fd, 0600) != 0 || ::fstat(fd, &info) != 0) {
    const int err = errno;
    ::close(fd);
    return fail(errno_message("event log " + path.string() + ": cannot set mode 0600", err));
  }
  return EventLog(fd, path, max_bytes, static_cast<uint64_t>(info.st_size));
}

Result<void> EventLog::write_line(const std::string& line) {
  // One write per line, so concurrent appenders (O_APPEND) never interleave within
  // a line; the loop only continues after a short write.
  std::size_t written = 0;
  while (written < line.size()) {
    const ssize_t done = ::write(fd_, line.data() + written, line.size() - written);
    if (done < 0 && errno == EINTR) continue;
    if (done < 0) return fail(errno_message("event log " + path_.string() + ": cannot write", errno));
    written += static_cast<std::size_t>(done);
  }
  size_ += line.size();
  return {};
}

Result<void> EventLog::append(const v1::JobEvent& event) {
  if (fd_ < 0) return fail("event log " + path_.string() + ": not open");
  const bool bulk = event.has_output() || event.has_console();
  const std::string line = event_to_json_line(event) + "\n";
  std::lock_guard lock(*write_mutex_);
  if (!bulk || max_bytes_ == 0 || size_ + line.size() <= max_bytes_)
    return write_line(line);
  if (truncated_) return {};
  truncated_ = true;
  v1::JobEvent marker;
  marker.set_job_id(event.job_id());
  marker.set_sequence(event.sequence());
  marker.set_timestamp_us(event.timestamp_us());
  marker.mutable_notice()->set_message(
    "events.jsonl truncated: it reached events_max_bytes (" + std::to_string(max_bytes_) +
    " bytes); later output and console lines of this job are not recorded");
  return write_line(event_to_json_line(marker) + "\n");
}

Result<std::vector<v1::JobEvent>> read_event_log(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return fail(errno_message("event log " + path.string() + ": cannot open", errno));
  std::vector<v1::JobEvent> events;
  std::string line;
  for (std::size_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto event = event_from_json_line(line);
    if (!event) return fail(path.string() + ":" + std::to_string(number) + ": " + event.error().message);
    events.push_back(std::move(*event));
  }
  if (in.bad()) return fail(errno_message("event log " + path.string() + ": cannot read", errno));
  return events;
}

}  // namespace solstice
