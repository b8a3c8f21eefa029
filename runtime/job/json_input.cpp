#include "runtime/job/json_input.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <vector>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

namespace solstice {

namespace fs = std::filesystem;
using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using nlohmann::json;

namespace json_input {

std::string shown(std::string_view value) {
  constexpr std::size_t limit = 80;
  std::string text = json(std::string(value.substr(0, limit)))
                         .dump(-1, ' ', false, json::error_handler_t::replace);
  if (value.size() > limit) text.insert(text.size() - 1, "...");
  return text;
}

std::string describe(const json& value) {
  switch (value.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return value.get<bool>() ? "true" : "false";
    case json::value_t::string: return "string " + shown(value.get_ref<const std::string&>());
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float: return "number " + value.dump();
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    default: return "an unsupported value";
  }
}

}  // namespace json_input

using json_input::describe;
using json_input::shown;

namespace {

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

std::string did_you_mean(const Descriptor* descriptor, std::string_view key) {
  std::string best;
  // Suggest only close misspellings: 1 edit for short keys, 2 from 6 characters on.
  std::size_t best_distance = std::min<std::size_t>(2, std::max<std::size_t>(1, key.size() / 3)) + 1;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* field = descriptor->field(i);
    for (const std::string& name : {field->name(), field->json_name()}) {
      const std::size_t distance = edit_distance(key, name);
      if (distance < best_distance) {
        best_distance = distance;
        best = field->name();
      }
    }
  }
  return best.empty() ? "" : " (did you mean '" + best + "'?)";
}

std::string join_path(const std::string& path, const std::string& name) {
  return path.empty() ? name : path + "." + name;
}
// ---------------------------------------------------------------- JSON shape checks
//
// Protobuf's own JSON parser reports problems as "(steps[0]) scrpt: Cannot find
// field." or "invalid value -1 for type TYPE_UINT32". This walk over the message
// descriptor catches the same problems first and says them plainly; protobuf's
// parser still does the conversion (and has the last word on anything missed here).

struct ShapeChecker {
  const std::string& source;

  Result<void> problem(const std::string& text) const { return fail(source + ": " + text); }

  Result<void> check_message(const Descriptor* descriptor, const json& value,
                             const std::string& path) const {
    if (!value.is_object()) {
      if (path.empty()) return problem("expected a JSON object at the top level, got " + describe(value));
      return problem("field '" + path + "' must be an object, got " + describe(value));
    }
    for (const auto& [key, item] : value.items()) {
      const FieldDescriptor* field = descriptor->FindFieldByName(key);
      for (int i = 0; field == nullptr && i < descriptor->field_count(); ++i) {
        if (descriptor->field(i)->json_name() == key) field = descriptor->field(i);
      }
      const std::string field_path = join_path(path, key);
      if (field == nullptr) {
        return problem("unknown field '" + field_path + "'" + did_you_mean(descriptor, key));
      }
      if (item.is_null()) continue;  // null means "default" in the protobuf JSON mapping
      if (field->is_map()) {
        if (!item.is_object()) {
          return problem("field '" + field_path + "' must be an object of names to values, got " +
                         describe(item));
        }
        const FieldDescriptor* value_field = field->message_type()->map_value();
        for (const auto& [map_key, map_value] : item.items()) {
          if (auto checked = check_single(value_field, map_value, field_path + "[" + shown(map_key) + "]");
              !checked) {
            return checked;
          }
        }
      } else if (field->is_repeated()) {
        if (!item.is_array()) {
          return problem("field '" + field_path + "' must be an array, got " + describe(item));
        }
        for (std::size_t i = 0; i < item.size(); ++i) {
          if (auto checked = check_single(field, item[i], field_path + "[" + std::to_string(i) + "]");
              !checked) {
            return checked;
          }
        }
      } else if (auto checked = check_single(field, item, field_path); !checked) {
        return checked;
      }
    }
    return {};
  }

  Result<void> check_single(const FieldDescriptor* field, const json& value,
                            const std::string& path) const {
    using Cpp = FieldDescriptor::CppType;
    const auto must_be = [&](const std::string& what) {
      return problem("field '" + path + "' must be " + what + ", got " + describe(value));
    };
    switch (field->cpp_type()) {
      case Cpp::CPPTYPE_MESSAGE:
        // Well-known types (Timestamp, Duration, ...) have JSON forms of their own.
        if (field->message_type()->file()->package() == "google.protobuf") return {};
        return check_message(field->message_type(), value, path);
      case Cpp::CPPTYPE_STRING:
        if (!value.is_string()) {
          return must_be(field->type() == FieldDescriptor::TYPE_BYTES ? "a base64 string" : "a string");
        }
        return {};
      case Cpp::CPPTYPE_BOOL:
        if (!value.is_boolean()) return must_be("true or false");
        return {};
      case Cpp::CPPTYPE_DOUBLE:
      case Cpp::CPPTYPE_FLOAT:
        if (!value.is_number() && !value.is_string()) return must_be("a number");
        return {};
      case Cpp::CPPTYPE_ENUM: {
        const auto* type = field->enum_type();
        if (value.is_number_integer()) return {};
        if (value.is_string() && type->FindValueByName(value.get<std::string>()) != nullptr) return {};
        std::string names;
        for (int i = 0; i < type->value_count(); ++i) {
          names += (i ? ", " : "") + type->value(i)->name();
        }
        return must_be("one of " + names);
      }
      case Cpp::CPPTYPE_INT32: return check_integer(value, path, std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max());
      case Cpp::CPPTYPE_INT64: return check_integer(value, path, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
      case Cpp::CPPTYPE_UINT32: return check_integer(value, path, 0, std::numeric_limits<uint32_t>::max());
      case Cpp::CPPTYPE_UINT64: return check_integer(value, path, 0, std::numeric_limits<uint64_t>::max());
    }
    return {};
  }

  // Integers may be JSON numbers or decimal strings (the protobuf JSON mapping
  // allows both); fractions and out-of-range values are refused.
  Result<void> check_integer(const json& value, const std::string& path, int64_t min,
                             uint64_t max) const {
    const auto refuse = [&]() {
      return problem("field '" + path + "' must be a whole number from " + std::to_string(min) +
                     " to " + std::to_string(max) + ", got " + describe(value));
    };
    const auto in_range_signed = [&](int64_t v) { return v >= min && (v < 0 || static_cast<uint64_t>(v) <= max); };
    if (value.is_number_unsigned()) return value.get<uint64_t>() <= max ? Result<void>{} : refuse();
    if (value.is_number_integer()) return in_range_signed(value.get<int64_t>()) ? Result<void>{} : refuse();
    if (value.is_number_float()) {
      const double v = value.get<double>();
      if (std::trunc(v) != v || v < static_cast<double>(min) || v > static_cast<double>(max)) return refuse();
      return {};
    }
    if (value.is_string()) {
      const auto& text = value.get_ref<const std::string&>();
      const char* end = text.data() + text.size();
      if (!text.empty() && text[0] == '-') {
        int64_t parsed = 0;
        auto [ptr, ec] = std::from_chars(text.data(), end, parsed);
        if (ec == std::errc() && ptr == end && in_range_signed(parsed)) return {};
      } else {
        uint64_t parsed = 0;
        auto [ptr, ec] = std::from_chars(text.data(), end, parsed);
        if (ec == std::errc() && ptr == end && parsed <= max) return {};
      }
    }
    return refuse();
  }
};

}  // namespace

Result<void> json_input::convert_checked(const json& document, std::string_view text,
                                         const std::string& source,
                                         google::protobuf::Message& message) {
  if (auto checked = ShapeChecker{source}.check_message(message.GetDescriptor(), document, ""); !checked) {
    return checked;
  }
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  message.Clear();
  const auto status = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(text.data(), text.size()), &message, options);
  if (!status.ok()) return fail(source + ": " + std::string(status.message()));
  return {};
}

Result<std::string> read_small_file(const fs::path& path, std::size_t max_bytes) {
  // O_NONBLOCK: a FIFO given by mistake must not block the open; it is refused below.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return fail(errno_message(path.string() + ": cannot open", errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int err = errno;
    ::close(fd);
    return fail(errno_message(path.string() + ": cannot stat", err));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    return fail(path.string() + (S_ISDIR(info.st_mode) ? ": is a directory, not a file" : ": is not a regular file"));
  }
  if (static_cast<std::size_t>(info.st_size) > max_bytes) {
    ::close(fd);
    return fail(path.string() + ": is " + std::to_string(info.st_size) + " bytes, more than the " +
                std::to_string(max_bytes) + " allowed");
  }
  std::string content;
  char buffer[65536];
  for (;;) {
    const ssize_t got = ::read(fd, buffer, sizeof buffer);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int err = errno;
      ::close(fd);
      return fail(errno_message(path.string() + ": cannot read", err));
    }
    if (got == 0) break;
    content.append(buffer, static_cast<std::size_t>(got));
    if (content.size() > max_bytes) {
      ::close(fd);
      return fail(path.string() + ": more than " + std::to_string(max_bytes) + " bytes");
    }
  }
  ::close(fd);
  return content;
}

Result<json> parse_json_text(std::string_view text, const std::string& source_name) {
  // A key given twice would silently lose one of its values: refuse it.
  std::vector<std::set<std::string>> keys_of_open_objects;
  std::string duplicate_key;
  const json::parser_callback_t track_keys = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys_of_open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end && !keys_of_open_objects.empty()) {
      keys_of_open_objects.pop_back();
    } else if (event == json::parse_event_t::key && !keys_of_open_objects.empty() &&
               !keys_of_open_objects.back().insert(parsed.get<std::string>()).second && duplicate_key.empty()) {
      duplicate_key = parsed.get<std::string>();
    }
    return true;
  };
  try {
    json document = json::parse(text.begin(), text.end(), track_keys);
    if (!duplicate_key.empty()) {
      return fail(source_name + ": key " + shown(duplicate_key) + " appears twice in one object");
    }
    return document;
  } catch (const json::parse_error& error) {
    // nlohmann counts lines after consuming the newline that ended a bad token, so
    // the position is worked out here from the byte offset (1-based; may be one past
    // the end for "unexpected end of input").
    const std::size_t index = std::min<std::size_t>(error.byte == 0 ? 0 : error.byte - 1, text.size());
    std::size_t line = 1, line_start = 0;
    for (std::size_t i = 0; i < index; ++i) {
      if (text[i] == '\n') {
        ++line;
        line_start = i + 1;
      }
    }
    std::string what = error.what();
    if (auto at = what.find(", column "); at != std::string::npos) {
      if (auto colon = what.find(": ", at); colon != std::string::npos) what = what.substr(colon + 2);
    }
    return fail(source_name + ":" + std::to_string(line) + ":" + std::to_string(index - line_start + 1) +
                ": invalid JSON: " + what);
  }
}

Result<void> parse_proto_json(std::string_view text, const std::string& source_name,
                              google::protobuf::Message& message) {
  auto document = parse_json_text(text, source_name);
  if (!document) return fail(document.error().message);
  return json_input::convert_checked(*document, text, source_name, message);
}

}  // namespace solstice
