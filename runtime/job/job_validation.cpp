// Job validation: every check that can be made before a VM starts, each problem
// reported on its own line naming its field and value.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "runtime/job/job_file.hpp"
#include "runtime/job/json_input.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/cloud_init.hpp"
#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {
namespace {

namespace fs = std::filesystem;
using json_input::shown;

// What validate_job found so far, one problem a line.
using Problems = std::vector<std::string>;

bool is_shell_identifier(std::string_view name) {
  if (name.empty() || (name[0] >= '0' && name[0] <= '9')) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
  });
}

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

// A job id names the job's files.
void check_job_id(const v1::JobSpec& spec, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
  if (!spec.id().empty() && !is_safe_job_id(spec.id())) {
    add("id " + shown(spec.id()) + ": may hold only letters, digits, '.', '_' and '-' (at most 128, "
        "not starting with '.'), because it names the job's files");
  }
}

// Where the VM comes from: exactly one of image and runs_on, and a disk QEMU can open.
void check_vm_source(const v1::JobSpec& spec, const v1::RunnerConfig& config, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
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
    } else if (image->disk().empty() && !image->url().empty()) {
      add("runs_on " + shown(spec.runs_on()) + ": the image is not in the image cache yet (url " + shown(image->url()) +
          "; solstice-runner run pulls it on first use, or solstice-runner image pull)");
    } else if (!image->disk().empty()) {
      const std::string where = "images[" + std::to_string(image - config.images().begin()) + "] (" +
                                shown(image->label()) + ") disk";
      if (auto why = disk_image_problem(image->disk(), image->disk_format(), where); !why.empty()) add(why);
    }
  }
}

// At least one step; every step has a script and a name of its own.
void check_steps(const v1::JobSpec& spec, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
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
}

// The size of the VM, and its firmware.
void check_vm_size(const v1::JobSpec& spec, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
  if (auto firmware = check_firmware(spec.firmware(), "firmware"); !firmware) add(firmware.error().message);
  if (spec.vcpus() > 64) {
    add("vcpus " + std::to_string(spec.vcpus()) + ": must be 0 (the image's default) or 1 to 64");
  }
  if (spec.memory_mib() != 0 && spec.memory_mib() < 64) {
    add("memory_mib " + std::to_string(spec.memory_mib()) + ": at least 64 MiB is needed to boot a guest");
  } else if (spec.memory_mib() > 1048576) {
    add("memory_mib " + std::to_string(spec.memory_mib()) + ": at most 1048576 (1 TiB)");
  }
}

// Files into the guest: a readable source, an absolute destination, a sensible mode.
void check_uploads(const v1::JobSpec& spec, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
  for (int i = 0; i < spec.uploads_size(); ++i) {
    const auto& upload = spec.uploads(i);
    const std::string where = "uploads[" + std::to_string(i) + "]";
    if (upload.has_content()) {
      if (!upload.source().empty())
        add(where + ": give either source or content, not both");
    } else if (upload.source().empty()) {
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
}

// Files out of the guest: a path, and a plain file name to store each under, used once.
void check_artifacts(const v1::JobSpec& spec, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
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
}

// Env and secrets: shell identifiers, each name in one place, no empty secret.
void check_environment(const v1::JobSpec& spec, Problems& problems) {
  const auto add = [&](std::string text) { problems.push_back(std::move(text)); };
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
}

// Numbers with an upper bound (job_file.hpp): seconds, counts.
void check_limits(const v1::JobSpec& spec, Problems& problems) {
  const auto check = [&](const std::string& field, uint32_t value, uint32_t cap, const char* unit) {
    if (value > cap) {
      problems.push_back(field + " " + std::to_string(value) + ": at most " + std::to_string(cap) + unit);
    }
  };
  check("timeout_seconds", spec.timeout_seconds(), max_timeout_seconds, " (7 days)");
  for (int i = 0; i < spec.steps_size(); ++i) {
    check("steps[" + std::to_string(i) + "] (" + shown(step_display_name(spec, i)) + ") timeout_seconds",
          spec.steps(i).timeout_seconds(), max_timeout_seconds, " (7 days)");
  }
  check("debug_on_failure.keep_seconds", spec.debug_on_failure().keep_seconds(), max_keep_seconds, " (1 day)");
  check("retries", spec.retries(), max_retries, "");
}

// Extra user-data for cloud-init: what the seed can carry (runtime/vm/cloud_init.hpp).
void check_user_data(const v1::JobSpec& spec, Problems& problems) {
  if (spec.user_data().empty()) return;
  if (auto type = user_data_type(spec.user_data()); !type) problems.push_back(type.error().message);
}

}  // namespace

Result<void> validate_job(const v1::JobSpec& spec, const v1::RunnerConfig& config) {
  Problems problems;
  check_job_id(spec, problems);
  check_vm_source(spec, config, problems);
  check_steps(spec, problems);
  check_vm_size(spec, problems);
  check_uploads(spec, problems);
  check_artifacts(spec, problems);
  check_environment(spec, problems);
  check_limits(spec, problems);
  check_user_data(spec, problems);
  if (problems.empty()) return {};
  std::string message;
  for (const auto& text : problems) message += (message.empty() ? "" : "\n") + text;
  return fail(message);
}

}  // namespace solstice
