#pragma once
// Wall-clock time as the runner's events and records carry it.
#include <cstdint>

namespace solstice {

// Microseconds since the Unix epoch (system clock): event timestamps, "since" times.
int64_t unix_now_us();

}  // namespace solstice
