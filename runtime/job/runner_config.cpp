#include "runtime/job/runner_config.hpp"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <thread>
#include <tuple>

#include <nlohmann/json.hpp>

#include "runtime/job/job_file.hpp"
#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* default_user = "runner";
constexpr unsigned default_vcpus = 1;
constexpr unsigned default_memory_mib = 512;
constexpr const char* default_machine = "pc";

std::string quoted(const std::string& text) {
  return json(text).dump(-1, ' ', false, json::error_handler_t::replace);
}

fs::path resolve_against(const fs::path& base_dir, const std::string& path) {
  if (path.empty()) return {};
  fs::path candidate(path);
  if (candidate.is_absolute()) return candidate.lexically_normal();
  return (base_dir / candidate).lexically_normal();
}

fs::path home_directory() {
  if (const char* home = std::getenv("HOME"); home != nullptr && home[0] == '/') return home;
  if (const passwd* entry = ::getpwuid(::geteuid()); entry != nullptr && entry->pw_dir != nullptr) {
    return entry->pw_dir;
  }
  return {};
}

// Fills what an image leaves empty with the defaults every image shares.
void apply_image_defaults(v1::ImageSpec& image) {
  if (image.user().empty()) image.set_user(default_user);
  if (image.vcpus() == 0) image.set_vcpus(default_vcpus);
  if (image.memory_mib() == 0) image.set_memory_mib(default_memory_mib);
  if (image.machine().empty()) image.set_machine(default_machine);
  if (image.boot_mode() == v1::BOOT_MODE_UNSPECIFIED) image.set_boot_mode(v1::BOOT_MODE_DISK);
}

// A raw image the firmware boots from starts with a partition table: an MBR boot
// signature (0x55 0xAA at byte 510, which a GPT's protective MBR has too) or a GPT
// header ("EFI PART" at byte 512). Anything else (a text file, a bare file system)
// would boot nothing and be seen only at the boot timeout.
Result<void> check_boot_sector(const std::string& path, const std::string& what) {
  const std::string shown = what + " " + quoted(path);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(errno_message(shown + ": cannot open", errno));
  unsigned char head[520] = {};
  ssize_t got;
  do {
    got = ::pread(fd, head, sizeof head, 0);
  } while (got < 0 && errno == EINTR);
  const int err = errno;
  ::close(fd);
  if (got < 0) return fail(errno_message(shown + ": cannot read", err));
  const bool mbr = got >= 512 && head[510] == 0x55 && head[511] == 0xAA;
  const bool gpt = got >= 520 && std::memcmp(head + 512, "EFI PART", 8) == 0;
  if (mbr || gpt) return {};
  return fail(shown + ": not a bootable raw disk image: it has no partition table (no MBR boot "
              "signature 0x55AA at byte 510, no GPT header); give a disk image (raw or qcow2)");
}

// Checks that the files an image names exist, and settles its disk format.
// `name_of` turns a field ("disk") into the words a message uses for it.
using FieldNamer = std::function<std::string(const std::string& field)>;
Result<void> check_image_files(v1::ImageSpec& image, const FieldNamer& name_of) {
  if (!image.disk().empty()) {
    auto detected = detect_disk_format(image.disk(), name_of("disk"));
    if (!detected) return fail(detected.error().message);
    if (image.disk_format().empty()) {
      image.set_disk_format(*detected);
    } else if (image.disk_format() == "raw" && *detected == "qcow2") {
      // A qcow2 file used as raw would hand the guest the qcow2 metadata as its disk.
      return fail(name_of("disk") + " " + quoted(image.disk()) + " is a qcow2 image, but " + name_of("disk_format") + " says \"raw\"");
    } else if (image.disk_format() == "qcow2" && *detected != "qcow2") {
      return fail(name_of("disk") + " " + quoted(image.disk()) + " has no qcow2 header, but " + name_of("disk_format") + " says \"qcow2\"");
    }
    if (image.disk_format() == "raw" && image.boot_mode() != v1::BOOT_MODE_KERNEL) {
      if (auto bootable = check_boot_sector(image.disk(), name_of("disk")); !bootable) return bootable;
    }
  } else if (!image.url().empty()) {
    return fail(name_of("url") + " " + quoted(image.url()) + ": not pulled into the image cache yet "
                "(solstice-runner run pulls it on first use, or: solstice-runner image pull URL --sha256 HEX --label " +
                image.label() + ")");
  } else if (image.boot_mode() != v1::BOOT_MODE_KERNEL) {
    return fail(name_of("disk") + " is empty: a disk-booted image needs a disk");
  }
  if (image.boot_mode() == v1::BOOT_MODE_KERNEL) {
    if (image.kernel().empty()) return fail(name_of("kernel") + " is empty: kernel boot needs a kernel");
    for (const auto& [field, path] : {std::pair{"kernel", image.kernel()}, std::pair{"initrd", image.initrd()}}) {
      if (path.empty()) continue;
      struct stat info {};
      if (::stat(path.c_str(), &info) != 0) {
        return fail(name_of(field) + " " + quoted(path) + ": " +
                    (errno == ENOENT ? std::string("no such file") : errno_message("cannot stat", errno)));
      }
      if (!S_ISREG(info.st_mode)) return fail(name_of(field) + " " + quoted(path) + ": is not a regular file");
    }
  }
  return {};
}

Result<std::string> manifest_string(const json& manifest, const char* key, const std::string& source) {
  if (!manifest.contains(key) || manifest[key].is_null()) return std::string();
  if (!manifest[key].is_string()) {
    return fail(source + ": \"" + key + "\" must be a string, got " + manifest[key].dump());
  }
  return manifest[key].get<std::string>();
}

Result<unsigned> manifest_count(const json& manifest, const char* key, const std::string& source) {
  if (!manifest.contains(key) || manifest[key].is_null()) return 0u;
  const auto& value = manifest[key];
  if (!value.is_number_unsigned() || value.get<uint64_t>() > 1048576) {
    return fail(source + ": \"" + key + "\" must be a whole number from 0 to 1048576, got " + value.dump());
  }
  return static_cast<unsigned>(value.get<uint64_t>());
}

}  // namespace

v1::RunnerConfig default_runner_config() {
  v1::RunnerConfig config;
  fs::path state_dir;
  if (::geteuid() == 0) {
    state_dir = "/var/lib/solstice-runner";
  } else if (const char* xdg = std::getenv("XDG_STATE_HOME"); xdg != nullptr && xdg[0] == '/') {
    state_dir = fs::path(xdg) / "solstice-runner";
  } else if (fs::path home = home_directory(); !home.empty()) {
    state_dir = home / ".local" / "state" / "solstice-runner";
  } else {
    state_dir = fs::temp_directory_path() / ("solstice-runner-" + std::to_string(::geteuid()));
  }
  config.set_state_dir(state_dir.string());
  config.set_qemu_binary("qemu-system-x86_64");
  config.set_accel("auto");
  config.set_kvm_device("/dev/kvm");
  config.set_default_job_timeout_seconds(3600);
  config.set_boot_timeout_seconds(300);
  config.set_powerdown_timeout_seconds(30);
  config.set_max_concurrent_vms(2);
  config.set_snapshots("auto");
  // A root runner never runs QEMU (strangers' guests) as root.
  if (::geteuid() == 0) config.set_qemu_user("solstice-qemu");
  return config;
}

Result<v1::RunnerConfig> load_runner_config(const fs::path& path) {
  auto text = read_small_file(path);
  if (!text) return fail(text.error().message);
  v1::RunnerConfig from_file;
  if (auto parsed = parse_proto_json(*text, path.string(), from_file); !parsed) {
    return fail(parsed.error().message);
  }
  std::error_code ignored;
  const fs::path base_dir = fs::absolute(path, ignored).parent_path();

  // proto3 cannot tell "left out" from 0 / "": both keep the default.
  v1::RunnerConfig config = default_runner_config();
  if (!from_file.state_dir().empty()) config.set_state_dir(resolve_against(base_dir, from_file.state_dir()).string());
  if (!from_file.qemu_binary().empty()) {
    // A bare name is looked up in PATH; a relative path is taken from the config's directory.
    const bool bare_name = from_file.qemu_binary().find('/') == std::string::npos;
    config.set_qemu_binary(bare_name ? from_file.qemu_binary()
                                     : resolve_against(base_dir, from_file.qemu_binary()).string());
  }
  if (!from_file.accel().empty()) config.set_accel(from_file.accel());
  if (!from_file.kvm_device().empty()) config.set_kvm_device(resolve_against(base_dir, from_file.kvm_device()).string());
  if (from_file.default_job_timeout_seconds()) config.set_default_job_timeout_seconds(from_file.default_job_timeout_seconds());
  if (from_file.boot_timeout_seconds()) config.set_boot_timeout_seconds(from_file.boot_timeout_seconds());
  if (from_file.powerdown_timeout_seconds()) config.set_powerdown_timeout_seconds(from_file.powerdown_timeout_seconds());
  if (from_file.max_concurrent_vms()) config.set_max_concurrent_vms(from_file.max_concurrent_vms());
  // Present even when 0, which turns the limit off.
  if (from_file.has_max_concurrent_starts()) config.set_max_concurrent_starts(from_file.max_concurrent_starts());
  if (!from_file.snapshots().empty()) config.set_snapshots(from_file.snapshots());
  // Present even when "": that asks for QEMU to run as the runner's user.
  if (from_file.has_qemu_user()) config.set_qemu_user(from_file.qemu_user());
  // Disk bounds: present even when 0, which turns the bound off (disk_limits.hpp).
  if (from_file.has_artifacts_max_bytes()) config.set_artifacts_max_bytes(from_file.artifacts_max_bytes());
  if (from_file.has_events_max_bytes()) config.set_events_max_bytes(from_file.events_max_bytes());
  if (from_file.has_console_max_bytes()) config.set_console_max_bytes(from_file.console_max_bytes());
  if (from_file.has_min_free_bytes()) config.set_min_free_bytes(from_file.min_free_bytes());
  for (const auto& image : from_file.images()) {
    auto* resolved = config.add_images();
    *resolved = image;
    if (image.has_restore_from())
      return fail(path.string() + ": images[" + std::to_string(config.images_size() - 1) +
                  "].restore_from: set by the runner only, not in a config file");
    resolved->set_disk(resolve_against(base_dir, image.disk()).string());
    resolved->set_kernel(resolve_against(base_dir, image.kernel()).string());
    resolved->set_initrd(resolve_against(base_dir, image.initrd()).string());
  }
  if (auto valid = validate_runner_config(config); !valid) {
    return fail(path.string() + ": " + valid.error().message);
  }
  return config;
}

unsigned max_concurrent_starts_of(const v1::RunnerConfig& config) {
  if (config.has_max_concurrent_starts())
    return config.max_concurrent_starts();
  return std::max(1u, std::thread::hardware_concurrency());
}

Result<void> validate_runner_config(const v1::RunnerConfig& config) {
  std::vector<std::string> problems;
  if (config.accel() != "auto" && config.accel() != "kvm" && config.accel() != "tcg") {
    problems.push_back("accel " + quoted(config.accel()) + ": must be \"auto\", \"kvm\" or \"tcg\"");
  }
  if (!config.snapshots().empty() && config.snapshots() != "auto" && config.snapshots() != "off") {
    problems.push_back("snapshots " + quoted(config.snapshots()) + ": must be \"auto\" or \"off\"");
  }
  if (config.max_concurrent_vms() == 0) problems.push_back("max_concurrent_vms 0: at least 1 VM must be allowed");
  // Caps (README, "Runner configuration"): beyond them a value is a typo, and no timer may overflow.
  for (const auto& [field, value, cap, unit] :
       {std::tuple{"default_job_timeout_seconds", config.default_job_timeout_seconds(), max_timeout_seconds, " (7 days)"},
        std::tuple{"boot_timeout_seconds", config.boot_timeout_seconds(), uint32_t{24 * 3600}, " (1 day)"},
        std::tuple{"powerdown_timeout_seconds", config.powerdown_timeout_seconds(), uint32_t{3600}, " (1 hour)"},
        std::tuple{"max_concurrent_vms", config.max_concurrent_vms(), uint32_t{1024}, ""},
        std::tuple{"max_concurrent_starts", config.max_concurrent_starts(), uint32_t{1024}, ""}}) {
    if (value > cap) {
      problems.push_back(std::string(field) + " " + std::to_string(value) + ": at most " + std::to_string(cap) + unit);
    }
  }
  std::map<std::string, int> image_by_label;
  for (int i = 0; i < config.images_size(); ++i) {
    const auto& image = config.images(i);
    const std::string where = "images[" + std::to_string(i) + "]";
    if (image.label().empty()) {
      problems.push_back(where + ".label is empty: jobs choose an image by its label (runs_on)");
    } else if (auto [existing, inserted] = image_by_label.emplace(image.label(), i); !inserted) {
      problems.push_back(where + ".label " + quoted(image.label()) + " is already used by images[" +
                         std::to_string(existing->second) + "]");
    }
    const bool kernel_boot = image.boot_mode() == v1::BOOT_MODE_KERNEL;
    if (kernel_boot && image.kernel().empty()) problems.push_back(where + ".kernel is empty: kernel boot needs a kernel");
    if (!kernel_boot && image.disk().empty() && image.url().empty()) {
      problems.push_back(where + ".disk is empty: a disk-booted image needs a disk (or a url and sha256 to pull it from)");
    }
    if (!image.url().empty()) {
      if (image.url().rfind("http://", 0) != 0 && image.url().rfind("https://", 0) != 0) {
        problems.push_back(where + ".url " + quoted(image.url()) + ": only http:// and https:// URLs can be pulled");
      }
      if (auto sha = normalize_sha256(image.sha256(), where + ".sha256"); !sha) {
        problems.push_back(sha.error().message + (image.sha256().empty() ? " (a url needs the sha256 of the image)" : ""));
      }
      if (!image.label().empty()) {
        if (auto named = check_image_label(image.label(), where + ".label"); !named) problems.push_back(named.error().message);
      }
    } else if (!image.sha256().empty()) {
      problems.push_back(where + ".sha256 is set without a url: it checks an image pulled from the url");
    }
    if (auto firmware = check_firmware(image.firmware(), where + ".firmware"); !firmware) {
      problems.push_back(firmware.error().message);
    }
    if (!image.disk_format().empty() && image.disk_format() != "qcow2" && image.disk_format() != "raw") {
      problems.push_back(where + ".disk_format " + quoted(image.disk_format()) + ": must be \"qcow2\", \"raw\" or empty (detect)");
    }
    if (image.vcpus() > 64) problems.push_back(where + ".vcpus " + std::to_string(image.vcpus()) + ": must be 0 (default 1) or 1 to 64");
    if (image.memory_mib() != 0 && image.memory_mib() < 64) {
      problems.push_back(where + ".memory_mib " + std::to_string(image.memory_mib()) + ": at least 64 MiB is needed to boot a guest");
    } else if (image.memory_mib() > 1048576) {
      problems.push_back(where + ".memory_mib " + std::to_string(image.memory_mib()) + ": at most 1048576 (1 TiB)");
    }
  }
  if (problems.empty()) return {};
  std::string message;
  for (const auto& text : problems) message += (message.empty() ? "" : "\n") + text;
  return fail(message);
}

Result<std::string> detect_disk_format(const fs::path& path, const std::string& what) {
  if (path.empty()) return fail(what + " is empty: give the path of a qcow2 or raw disk image");
  const std::string shown = what + " " + quoted(path.string());
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    if (errno == ENOENT) return fail(shown + ": no such file");
    return fail(errno_message(shown + ": cannot stat", errno));
  }
  if (S_ISDIR(info.st_mode)) return fail(shown + ": is a directory, not a disk image");
  if (!S_ISREG(info.st_mode)) return fail(shown + ": is not a regular file");
  if (info.st_size == 0) return fail(shown + ": is empty (0 bytes), not a disk image");
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(errno_message(shown + ": cannot open", errno));
  char magic[4] = {};
  ssize_t got;
  do {
    got = ::pread(fd, magic, sizeof magic, 0);
  } while (got < 0 && errno == EINTR);
  const int err = errno;
  ::close(fd);
  if (got < 0) return fail(errno_message(shown + ": cannot read", err));
  if (got == 4 && std::memcmp(magic, "QFI\xfb", 4) == 0) return std::string("qcow2");
  return std::string("raw");
}

Result<v1::ImageSpec> resolve_image(const v1::JobSpec& job, const v1::RunnerConfig& config) {
  v1::ImageSpec image;
  FieldNamer name_of;
  if (!job.image().empty() && !job.runs_on().empty()) {
    return fail("image " + quoted(job.image()) + " and runs_on " + quoted(job.runs_on()) +
                " are both set: a job names exactly one of them");
  }
  if (!job.image().empty()) {
    std::error_code ignored;
    image.set_label(job.image());
    image.set_disk(fs::absolute(job.image(), ignored).lexically_normal().string());
    name_of = [](const std::string& field) { return field == "disk" ? std::string("image") : field; };
  } else if (!job.runs_on().empty()) {
    int index = -1;
    for (int i = 0; i < config.images_size(); ++i) {
      if (config.images(i).label() == job.runs_on()) {
        index = i;
        break;
      }
    }
    if (index < 0) return fail("runs_on " + quoted(job.runs_on()) + ": no image has this label");
    image = config.images(index);
    const std::string where = "images[" + std::to_string(index) + "] (" + quoted(image.label()) + ")";
    name_of = [where](const std::string& field) { return where + " " + field; };
  } else {
    return fail("neither image nor runs_on is set: a job names exactly one of them");
  }
  apply_image_defaults(image);
  if (auto checked = check_image_files(image, name_of); !checked) return fail(checked.error().message);
  if (job.vcpus() != 0) image.set_vcpus(job.vcpus());
  if (job.memory_mib() != 0) image.set_memory_mib(job.memory_mib());
  if (!job.firmware().empty()) image.set_firmware(job.firmware());
  if (image.firmware().empty()) image.set_firmware("bios");
  if (image.firmware() == "uefi") {
    for (const char* path : {ovmf_code_path, ovmf_vars_path}) {
      if (::access(path, R_OK) != 0) {
        return fail(errno_message("firmware \"uefi\" needs OVMF (apt-get install ovmf): " + std::string(path), errno));
      }
    }
  }
  return image;
}

Result<v1::ImageSpec> load_test_guest_image(const fs::path& dir) {
  std::error_code ignored;
  const fs::path base = fs::absolute(dir, ignored).lexically_normal();
  const fs::path manifest_path = base / "guest.json";
  const std::string source = manifest_path.string();
  auto text = read_small_file(manifest_path, 1u << 20);
  if (!text) return fail(text.error().message + " (is the test guest built? deploy/test-guest/build.sh DIR)");
  auto manifest = parse_json_text(*text, source);
  if (!manifest) return fail(manifest.error().message);
  if (!manifest->is_object()) return fail(source + ": expected a JSON object, got " + manifest->dump());

  // Unknown keys are ignored: the manifest belongs to the guest builder and may grow.
  std::map<std::string, std::string> strings;
  for (const char* key : {"user_default", "user", "disk", "disk_format", "kernel", "initrd", "cmdline",
                          "machine", "boot", "firmware"}) {
    auto value = manifest_string(*manifest, key, source);
    if (!value) return fail(value.error().message);
    strings[key] = *value;
  }
  auto memory = manifest_count(*manifest, "memory_mib", source);
  if (!memory) return fail(memory.error().message);
  auto vcpus = manifest_count(*manifest, "vcpus", source);
  if (!vcpus) return fail(vcpus.error().message);

  v1::ImageSpec image;
  image.set_label(test_guest_label);
  image.set_user(!strings["user_default"].empty() ? strings["user_default"] : strings["user"]);
  image.set_disk(resolve_against(base, strings["disk"]).string());
  image.set_disk_format(strings["disk_format"]);
  image.set_kernel(resolve_against(base, strings["kernel"]).string());
  image.set_initrd(resolve_against(base, strings["initrd"]).string());
  image.set_kernel_append(strings["cmdline"]);
  image.set_machine(strings["machine"]);
  image.set_firmware(strings["firmware"]);
  if (auto firmware = check_firmware(image.firmware(), source + ": \"firmware\""); !firmware) {
    return fail(firmware.error().message);
  }
  image.set_memory_mib(*memory);
  image.set_vcpus(*vcpus);
  // The guest's disk boots through the firmware like a cloud image, which is the
  // path real jobs take; the kernel and initrd are kept for a direct boot.
  const std::string& boot = strings["boot"];
  if (boot == "kernel" || (boot.empty() && image.disk().empty())) {
    image.set_boot_mode(v1::BOOT_MODE_KERNEL);
  } else if (boot == "disk" || boot.empty()) {
    image.set_boot_mode(v1::BOOT_MODE_DISK);
  } else {
    return fail(source + ": \"boot\" must be \"disk\" or \"kernel\", got " + quoted(boot));
  }
  if (image.disk().empty() && image.kernel().empty()) {
    return fail(source + ": names neither a \"disk\" nor a \"kernel\"");
  }
  if (image.memory_mib() != 0 && image.memory_mib() < 64) {
    return fail(source + ": \"memory_mib\" " + std::to_string(image.memory_mib()) +
                ": at least 64 MiB is needed to boot a guest");
  }
  if (image.vcpus() > 64) return fail(source + ": \"vcpus\" " + std::to_string(image.vcpus()) + ": at most 64");
  apply_image_defaults(image);
  const FieldNamer name_of = [&source](const std::string& field) { return source + ": \"" + field + "\""; };
  if (auto checked = check_image_files(image, name_of); !checked) return fail(checked.error().message);
  return image;
}

}  // namespace solstice
