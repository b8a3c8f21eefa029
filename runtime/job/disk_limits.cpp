#include "runtime/job/disk_limits.hpp"

#include <sys/statvfs.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>

namespace solstice {

namespace fs = std::filesystem;

DiskLimits disk_limits_of(const v1::RunnerConfig& config) {
  DiskLimits limits;
  if (config.has_artifacts_max_bytes()) limits.artifacts_max_bytes = config.artifacts_max_bytes();
  if (config.has_events_max_bytes()) limits.events_max_bytes = config.events_max_bytes();
  if (config.has_console_max_bytes()) limits.console_max_bytes = config.console_max_bytes();
  if (config.has_min_free_bytes()) limits.min_free_bytes = config.min_free_bytes();
  return limits;
}

std::string bytes_text(uint64_t bytes) {
  const char* units[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double value = static_cast<double>(bytes);
  int unit = -1;
  while (value >= 1024.0 && unit < 5) {
    value /= 1024.0;
    ++unit;
  }
  std::string text = std::to_string(bytes) + " bytes";
  if (unit >= 0) {
    char scaled[32];
    std::snprintf(scaled, sizeof scaled, " (%.1f %s)", value, units[unit]);
    text += scaled;
  }
  return text;
}

Result<void> check_free_space(const v1::RunnerConfig& config) {
  const uint64_t wanted = disk_limits_of(config).min_free_bytes;
  if (wanted == 0)
    return {};
  // The state directory may not exist yet: its nearest existing parent is on the
  // file system it will be made on.
  fs::path where = fs::absolute(config.state_dir());
  std::error_code ec;
  while (!fs::exists(where, ec) && where.has_parent_path() && where != where.parent_path())
    where = where.parent_path();
  struct statvfs info {};
  if (::statvfs(where.c_str(), &info) != 0)
    return fail(errno_message("cannot check the free space of " + where.string() +
                                " (for min_free_bytes)", errno));
  const uint64_t available = uint64_t{info.f_bavail} * info.f_frsize;
  if (available < wanted)
    return fail("not enough free disk space to start a job: the file system of the state "
                "directory " + config.state_dir() + " has " + bytes_text(available) +
                " available, less than min_free_bytes " + bytes_text(wanted) +
                " (free some space, e.g. `solstice-runner prune`, or lower min_free_bytes)");
  return {};
}

std::string artifacts_cap_message(uint64_t limit, const std::string& artifact_path) {
  return "artifacts exceed artifacts_max_bytes " + bytes_text(limit) + " (at " + artifact_path +
         "); the job's artifacts were removed";
}

}  // namespace solstice
