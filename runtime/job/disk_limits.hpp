#pragma once
// Bounded disk (README "Disk use"): what one job may write into its record, and the
// free space a job needs before it starts. Each bound is a runner config key; left
// out it has the default below, 0 turns it off.
//   artifacts_max_bytes  all artifacts of a job together; beyond it the job FAILS and
//                        its artifacts are removed (a download stops at the bound,
//                        so no more than that is ever written)
//   events_max_bytes     events.jsonl; beyond it output and console events are left
//                        out (one notice says so), other events are still recorded
//   console_max_bytes    console.log; beyond it the capture ends with a marker line
//   min_free_bytes       free space of the state directory's file system; below it
//                        a job is refused before anything of it is made
#include <cstdint>
#include <string>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

inline constexpr uint64_t mib = uint64_t{1} << 20;
inline constexpr uint64_t default_artifacts_max_bytes = 1024 * mib;
inline constexpr uint64_t default_events_max_bytes = 64 * mib;
inline constexpr uint64_t default_console_max_bytes = 16 * mib;
inline constexpr uint64_t default_min_free_bytes = 1024 * mib;

// The bounds in effect (0 = none): the config's values, defaults for keys it lacks.
struct DiskLimits {
  uint64_t artifacts_max_bytes = default_artifacts_max_bytes;
  uint64_t events_max_bytes = default_events_max_bytes;
  uint64_t console_max_bytes = default_console_max_bytes;
  uint64_t min_free_bytes = default_min_free_bytes;
};
DiskLimits disk_limits_of(const v1::RunnerConfig& config);

// "1073741824 bytes (1.0 GiB)": a size as the messages print it.
std::string bytes_text(uint64_t bytes);

// An error when the file system of config.state_dir (or of its nearest existing
// parent) has less than min_free_bytes available, naming both numbers and the key.
Result<void> check_free_space(const v1::RunnerConfig& config);

// The message of a job whose artifacts exceeded artifacts_max_bytes.
std::string artifacts_cap_message(uint64_t limit, const std::string& artifact_path);

}  // namespace solstice
