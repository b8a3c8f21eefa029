#include "runtime/base/idle_watch.hpp"

namespace solstice {

IdleWatch::IdleWatch(double busy_share, Clock::duration quiet_for)
    : busy_share_(busy_share), quiet_for_(quiet_for) {}

bool IdleWatch::sample(Clock::time_point now, std::chrono::milliseconds cpu_time) {
  if (last_at_ && now > *last_at_) {
    const auto wall = std::chrono::duration<double>(now - *last_at_).count();
    const auto used = std::chrono::duration<double>(cpu_time - last_cpu_).count();
    if (used > busy_share_ * wall)
      quiet_since_.reset();
    else if (!quiet_since_)
      quiet_since_ = *last_at_;
  }
  last_at_ = now;
  last_cpu_ = cpu_time;
  return quiet_since_ && now - *quiet_since_ >= quiet_for_;
}

}  // namespace solstice
