#include "runtime/job/job_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <random>
#include <limits>
#include <map>
#include <set>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "runtime/base/shell.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {
namespace {

namespace fs = std::filesystem;
using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using nlohmann::json;

// ---------------------------------------------------------------- small helpers

// A value as it appears in messages: JSON-quoted (invalid UTF-8 replaced), shortened.
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

bool is_shell_identifier(std::string_view name) {
  if (name.empty() || (name[0] >= '0' && name[0] <= '9')) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  });
}

fs::path resolve_against(const fs::path& base_dir, const std::string& path) {
  if (path.empty()) return {};
  fs::path candidate(path);
  if (candidate.is_absolute()) return candidate.lexically_normal();
  std::error_code ignored;
  const fs::path base = base_dir.empty() ? fs::current_path(ignored) : fs::absolute(base_dir, ignored);
  return (base / candidate).lexically_normal();
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

Result<void> convert_checked(const json& document, std::string_view text, const std::string& source,
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

// ---------------------------------------------------------------- jobrequest.v1
//
// solstice-ci's job request names a repository, a commit and a script inside it;
// it carries no steps. There is no checkout on the runner side, so the request
// becomes a job whose steps do it in the guest:
//  - repo_url, commit_sha (and request id, owner, name, workflow job id when set)
//    become env vars SOLSTICE_REPO_URL, SOLSTICE_COMMIT_SHA, ...;
//  - with a repo_url, a first step "checkout" clones it into $HOME/workspace and
//    checks out the commit, if git exists in the guest (without git it says so and
//    the job goes on: the image may carry the sources another way);
//  - a step "run <script_path>" runs the script from $HOME/workspace when that
//    exists (else from the login directory); a relative path is taken from there,
//    the script is executed directly when it is executable, else with sh.
// workflow_path (solstice-ci's KDL workflows) is not supported: script_path is
// required. Keys of the request this runner does not use are ignored, so newer
// requests still load.

bool is_job_request(const json& document) {
  return document.contains("request_id") || document.contains("script_path") ||
         document.contains("schema_version");
}

Result<v1::JobSpec> job_from_request(const json& document, const std::string& source) {
  static const char* const string_keys[] = {
      "schema_version", "request_id", "group_id", "source", "repo_url", "repo_owner", "repo_name",
      "commit_sha", "workflow_path", "workflow_job_id", "runs_on", "script_path", "submitted_at"};
  std::map<std::string, std::string> fields;
  for (const char* key : string_keys) {
    if (!document.contains(key) || document[key].is_null()) continue;
    if (!document[key].is_string()) {
      return fail(source + ": jobrequest.v1 field '" + key + "' must be a string, got " +
                  describe(document[key]));
    }
    fields[key] = document[key].get<std::string>();
  }
  const auto get = [&](const char* key) {
    auto found = fields.find(key);
    return found == fields.end() ? std::string() : found->second;
  };
  if (!get("schema_version").empty() && get("schema_version") != "jobrequest.v1") {
    return fail(source + ": schema_version " + shown(get("schema_version")) +
                " is not supported (expected \"jobrequest.v1\")");
  }
  if (get("script_path").empty()) {
    return fail(source + ": jobrequest.v1 field 'script_path' is missing or empty: this runner runs "
                "one script per request (workflow_path is not supported)");
  }

  v1::JobSpec spec;
  spec.set_id(get("request_id"));
  spec.set_runs_on(get("runs_on"));
  if (!get("repo_owner").empty() && !get("repo_name").empty()) {
    std::string name = get("repo_owner") + "/" + get("repo_name");
    if (!get("commit_sha").empty()) name += "@" + get("commit_sha").substr(0, 12);
    spec.set_name(name);
  } else {
    spec.set_name("jobrequest " + get("request_id"));
  }
  auto& env = *spec.mutable_env();
  const std::pair<const char*, const char*> env_of[] = {
      {"request_id", "SOLSTICE_REQUEST_ID"}, {"repo_url", "SOLSTICE_REPO_URL"},
      {"commit_sha", "SOLSTICE_COMMIT_SHA"}, {"repo_owner", "SOLSTICE_REPO_OWNER"},
      {"repo_name", "SOLSTICE_REPO_NAME"},   {"workflow_job_id", "SOLSTICE_WORKFLOW_JOB_ID"}};
  for (const auto& [key, variable] : env_of) {
    if (!get(key).empty()) env[variable] = get(key);
  }

  if (!get("repo_url").empty()) {
    auto* checkout = spec.add_steps();
    checkout->set_name("checkout");
    checkout->set_script(
        "set -eu\n"
        "if ! command -v git >/dev/null 2>&1; then\n"
        "  echo \"git is not installed in the guest: not cloning $SOLSTICE_REPO_URL\" >&2\n"
        "  exit 0\n"
        "fi\n"
        "workspace=\"$HOME/workspace\"\n"
        "rm -rf \"$workspace\"\n"
        "git clone --quiet \"$SOLSTICE_REPO_URL\" \"$workspace\"\n"
        "if [ -n \"${SOLSTICE_COMMIT_SHA:-}\" ]; then\n"
        "  git -C \"$workspace\" checkout --quiet --detach \"$SOLSTICE_COMMIT_SHA\"\n"
        "fi\n"
        "git -C \"$workspace\" log -1 --oneline\n");
  }
  auto* run = spec.add_steps();
  run->set_name("run " + get("script_path"));
  run->set_script(
      "workspace=\"$HOME/workspace\"\n"
      "if [ -d \"$workspace\" ]; then cd \"$workspace\" || exit 1; fi\n"
      "script=" + shell_quote(get("script_path")) + "\n"
      "case \"$script\" in /*) ;; *) script=\"./$script\" ;; esac\n"
      "if [ ! -f \"$script\" ]; then\n"
      "  echo \"script_path $script: no such file in $(pwd)\" >&2\n"
      "  exit 127\n"
      "fi\n"
      "if [ -x \"$script\" ]; then exec \"$script\"; else exec sh \"$script\"; fi\n");
  return spec;
}

// ---------------------------------------------------------------- validation helpers

// Describes why a regular readable file is not there, or "" when it is.
std::string file_problem(const fs::path& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    return errno == ENOENT ? "no such file" : errno_message("cannot stat", errno);
  }
  if (S_ISDIR(info.st_mode)) return "is a directory, not a file";
  if (!S_ISREG(info.st_mode)) return "is not a regular file";
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_message("cannot open", errno);
  ::close(fd);
  return "";
}

// Why the disk image at `path` cannot be a VM's base, or "" when it can: its file
// and header first (cheap), then whether QEMU can open it as the format it would
// be given (`configured_format`, or the one its header shows when empty).
std::string disk_image_problem(const std::string& path, const std::string& configured_format,
                               const std::string& what) {
  auto detected = detect_disk_format(path, what);
  if (!detected) return detected.error().message;
  const std::string& format = configured_format.empty() ? *detected : configured_format;
  if (auto usable = check_disk_image(path, format, what); !usable) return usable.error().message;
  return {};
}

std::string configured_labels(const v1::RunnerConfig& config) {
  if (config.images_size() == 0) return "the runner's configuration has no images";
  std::string labels = "configured labels: ";
  for (int i = 0; i < config.images_size(); ++i) {
    labels += (i ? ", " : "") + shown(config.images(i).label());
  }
  return labels;
}

bool is_safe_job_id(std::string_view id) {
  if (id.size() > 128 || id.front() == '.') return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '-' || c == '.';
  });
}

}  // namespace

// ---------------------------------------------------------------- public

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
  return convert_checked(*document, text, source_name, message);
}

Result<v1::JobSpec> parse_job_json(std::string_view text, const std::string& source_name,
                                   const fs::path& base_dir) {
  auto document = parse_json_text(text, source_name);
  if (!document) return fail(document.error().message);
  if (!document->is_object()) {
    return fail(source_name + ": a job file holds one JSON object, got " + describe(*document));
  }
  v1::JobSpec spec;
  if (is_job_request(*document)) {
    auto converted = job_from_request(*document, source_name);
    if (!converted) return converted;
    spec = std::move(*converted);
  } else if (auto parsed = convert_checked(*document, text, source_name, spec); !parsed) {
    return fail(parsed.error().message);
  }

  for (int i = 0; i < spec.steps_size(); ++i) {
    if (spec.steps(i).name().empty()) spec.mutable_steps(i)->set_name("step " + std::to_string(i + 1));
  }
  if (!spec.image().empty()) spec.set_image(resolve_against(base_dir, spec.image()).string());
  for (auto& upload : *spec.mutable_uploads()) {
    if (!upload.source().empty()) upload.set_source(resolve_against(base_dir, upload.source()).string());
  }
  return spec;
}

Result<v1::JobSpec> load_job_file(const fs::path& path) {
  auto text = read_small_file(path);
  if (!text) return fail(text.error().message);
  std::error_code ignored;
  return parse_job_json(*text, path.string(), fs::absolute(path, ignored).parent_path());
}

std::string step_display_name(const v1::JobSpec& spec, int index) {
  if (index >= 0 && index < spec.steps_size() && !spec.steps(index).name().empty()) {
    return spec.steps(index).name();
  }
  return "step " + std::to_string(index + 1);
}

std::vector<std::string> job_secret_values(const v1::JobSpec& spec) {
  std::vector<std::string> values;
  for (const auto& [name, value] : spec.secrets()) values.push_back(value);
  return values;
}

Result<void> validate_job(const v1::JobSpec& spec, const v1::RunnerConfig& config) {
  std::vector<std::string> problems;
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };

  if (!spec.id().empty() && !is_safe_job_id(spec.id())) {
    add("id " + shown(spec.id()) + ": may hold only letters, digits, '.', '_' and '-' (at most 128, "
        "not starting with '.'), because it names the job's files");
  }

  // Where the VM comes from.
  if (!spec.image().empty() && !spec.runs_on().empty()) {
    add("image " + shown(spec.image()) + " and runs_on " + shown(spec.runs_on()) +
        " are both set: a job names exactly one of them");
  } else if (spec.image().empty() && spec.runs_on().empty()) {
    add("neither image nor runs_on is set: a job names exactly one of them (a qcow2 or raw disk "
        "image, or a label from the runner's configuration)");
  } else if (!spec.image().empty()) {
    if (auto why = disk_image_problem(spec.image(), "", "image"); !why.empty()) add(why);
  } else {
    const auto image = std::find_if(config.images().begin(), config.images().end(),
                                    [&](const v1::ImageSpec& candidate) { return candidate.label() == spec.runs_on(); });
    if (image == config.images().end()) {
      add("runs_on " + shown(spec.runs_on()) + ": no image has this label (" + configured_labels(config) + ")");
    } else if (!image->disk().empty()) {
      const std::string where = "images[" + std::to_string(image - config.images().begin()) + "] (" +
                                shown(image->label()) + ") disk";
      if (auto why = disk_image_problem(image->disk(), image->disk_format(), where); !why.empty()) add(why);
    }
  }

  // Steps.
  if (spec.steps_size() == 0) add("steps: a job needs at least one step");
  std::map<std::string, int> step_by_name;
  for (int i = 0; i < spec.steps_size(); ++i) {
    const auto& step = spec.steps(i);
    const std::string name = step_display_name(spec, i);
    const std::string where = "steps[" + std::to_string(i) + "] (" + shown(name) + ")";
    if (step.script().find_first_not_of(" \t\r\n") == std::string::npos) add(where + ": script is empty");
    if (auto [existing, inserted] = step_by_name.emplace(name, i); !inserted) {
      add(where + ": the name is already used by steps[" + std::to_string(existing->second) +
          "]; step names must be unique");
    }
  }

  // Size of the VM.
  if (spec.vcpus() > 64) {
    add("vcpus " + std::to_string(spec.vcpus()) + ": must be 0 (the image's default) or 1 to 64");
  }
  if (spec.memory_mib() != 0 && spec.memory_mib() < 64) {
    add("memory_mib " + std::to_string(spec.memory_mib()) + ": at least 64 MiB is needed to boot a guest");
  } else if (spec.memory_mib() > 1048576) {
    add("memory_mib " + std::to_string(spec.memory_mib()) + ": at most 1048576 (1 TiB)");
  }

  // Files in and out.
  for (int i = 0; i < spec.uploads_size(); ++i) {
    const auto& upload = spec.uploads(i);
    const std::string where = "uploads[" + std::to_string(i) + "]";
    if (upload.source().empty()) {
      add(where + ".source is empty: give a file on the runner host");
    } else if (auto why = file_problem(upload.source()); !why.empty()) {
      add(where + ".source " + shown(upload.source()) + ": " + why);
    }
    if (upload.destination().empty()) {
      add(where + ".destination is empty: give an absolute path in the guest");
    } else if (upload.destination().front() != '/') {
      add(where + ".destination " + shown(upload.destination()) + ": must be an absolute path in the guest");
    }
    const std::string mode_digits = std::to_string(upload.mode());
    if (upload.mode() > 07777) {
      add(where + ".mode " + mode_digits + ": not a file mode (at most 07777, i.e. 4095; "
          "JSON has no octal: 0755 is written 493)");
    } else if (upload.mode() > 0777 && (upload.mode() & 0400) == 0) {
      // Special bits on a file its owner cannot read: 755 or 644 written in decimal
      // (= 01363, 01204), surely meant as octal.
      const bool octal_digits = mode_digits.find_first_not_of("01234567") == std::string::npos;
      add(where + ".mode " + mode_digits + ": not a sensible file mode" +
          (octal_digits ? " (JSON has no octal: 0" + mode_digits + " is written " +
                              std::to_string(std::stoul(mode_digits, nullptr, 8)) + ")"
                        : std::string()));
    }
  }
  std::map<std::string, int> artifact_by_destination;
  for (int i = 0; i < spec.artifacts_size(); ++i) {
    const auto& artifact = spec.artifacts(i);
    const std::string where = "artifacts[" + std::to_string(i) + "]";
    if (artifact.path().empty()) {
      add(where + ".path is empty: give a path in the guest");
      continue;
    }
    std::string destination = artifact.destination();
    if (destination.empty()) {
      destination = fs::path(artifact.path()).filename().string();
      if (destination.empty() || destination == "." || destination == "..") {
        add(where + ".path " + shown(artifact.path()) + ": has no file name to store it under; give a destination");
        continue;
      }
    } else if (destination == "." || destination == ".." || destination.find('/') != std::string::npos ||
               destination.find('\0') != std::string::npos) {
      add(where + ".destination " + shown(destination) +
          ": must be a plain file name (no '/', not '.' or '..')");
      continue;
    }
    if (auto [existing, inserted] = artifact_by_destination.emplace(destination, i); !inserted) {
      add(where + ": destination " + shown(destination) + " is already used by artifacts[" +
          std::to_string(existing->second) + "]");
    }
  }

  // Environment.
  // Sorted, so that messages come in a stable order (protobuf maps have none).
  const std::map<std::string, std::string> env(spec.env().begin(), spec.env().end());
  const std::map<std::string, std::string> secrets(spec.secrets().begin(), spec.secrets().end());
  for (const auto& [name, value] : env) {
    if (!is_shell_identifier(name)) {
      add("env name " + shown(name) + ": must be a shell identifier (letters, digits and '_', not starting with a digit)");
    }
    if (secrets.count(name)) add("env " + shown(name) + " is also a secret: give it in one place only");
  }
  for (const auto& [name, value] : secrets) {
    if (!is_shell_identifier(name)) {
      add("secrets name " + shown(name) + ": must be a shell identifier (letters, digits and '_', not starting with a digit)");
    }
    if (value.empty()) add("secrets " + shown(name) + ": value is empty (an empty secret cannot be hidden)");
  }

  if (problems.empty()) return {};
  std::string message;
  for (const auto& text : problems) message += (message.empty() ? "" : "\n") + text;
  return fail(message);
}

std::string make_job_id() {
  auto now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &utc);
  std::random_device random;
  char suffix[16];
  std::snprintf(suffix, sizeof suffix, "%06x", random() & 0xffffff);
  return std::string{stamp} + "-" + suffix;
}

}  // namespace solstice
