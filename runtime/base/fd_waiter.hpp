#pragma once
// Wakes its owner when one of a set of file descriptors becomes readable, so an
// actor that must not block can still react at once instead of polling on a
// timer (a 10 ms timer costs two thread wake-ups a tick, for the whole job).
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace solstice {

class FdWaiter {
 public:
  // A thread blocks in poll(2) on `fds` and calls `on_ready` (from that thread)
  // when one is readable, has hung up or failed, or `fallback` has passed
  // without either. It then waits for rearm() before it polls again: a
  // level-triggered fd would otherwise fire again and again until the owner has
  // read it.
  FdWaiter(std::vector<int> fds, std::function<void()> on_ready,
           std::chrono::milliseconds fallback);
  ~FdWaiter();  // stops the thread and joins it; on_ready is not called after
  FdWaiter(const FdWaiter&) = delete;
  FdWaiter& operator=(const FdWaiter&) = delete;

  // The owner has handled the last wake-up: poll again, on `fds` from now on.
  void rearm(std::vector<int> fds);
  void rearm();

 private:
  void run();

  std::mutex mutex_;
  std::condition_variable rearmed_;
  std::vector<int> fds_;
  std::function<void()> on_ready_;
  std::chrono::milliseconds fallback_;
  bool armed_ = true;
  bool stopping_ = false;
  int stop_fd_ = -1;  // eventfd: wakes the poll when stopping
  std::thread thread_;
};

}  // namespace solstice
