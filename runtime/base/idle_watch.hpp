#pragma once
// Tells from samples of a process's CPU time when it has gone idle: used to save a
// template's state only once its guest has finished what it was doing (QEMU's CPU
// time barely grows while the guest's CPUs halt).

#include <chrono>
#include <optional>

namespace solstice {

class IdleWatch {
 public:
  using Clock = std::chrono::steady_clock;

  // Idle: the process used at most `busy_share` of one core in every interval
  // between samples for `quiet_for` of wall time in a row.
  IdleWatch(double busy_share, Clock::duration quiet_for);

  // One sample: the process's CPU time so far, read at `now`. True once idle.
  bool sample(Clock::time_point now, std::chrono::milliseconds cpu_time);

 private:
  double busy_share_;
  Clock::duration quiet_for_;
  std::optional<Clock::time_point> last_at_;
  std::chrono::milliseconds last_cpu_{0};
  std::optional<Clock::time_point> quiet_since_;
};

}  // namespace solstice
