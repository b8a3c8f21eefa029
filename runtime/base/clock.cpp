#include "runtime/base/clock.hpp"

#include <chrono>

namespace solstice {

int64_t unix_now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace solstice
