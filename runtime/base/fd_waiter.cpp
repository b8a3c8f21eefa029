#include "runtime/base/fd_waiter.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

namespace solstice {

FdWaiter::FdWaiter(std::vector<int> fds, std::function<void()> on_ready,
                   std::chrono::milliseconds fallback)
    : fds_(std::move(fds)), on_ready_(std::move(on_ready)), fallback_(fallback) {
  stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  thread_ = std::thread([this] { run(); });
}

FdWaiter::~FdWaiter() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  rearmed_.notify_all();
  if (stop_fd_ >= 0) {
    uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof one);
  }
  thread_.join();
  if (stop_fd_ >= 0)
    ::close(stop_fd_);
}

void FdWaiter::rearm(std::vector<int> fds) {
  {
    std::lock_guard lock(mutex_);
    fds_ = std::move(fds);
    armed_ = true;
  }
  rearmed_.notify_all();
}

void FdWaiter::rearm() {
  {
    std::lock_guard lock(mutex_);
    armed_ = true;
  }
  rearmed_.notify_all();
}

void FdWaiter::run() {
  std::vector<pollfd> polled;
  for (;;) {
    {
      std::unique_lock lock(mutex_);
      rearmed_.wait(lock, [this] { return armed_ || stopping_; });
      if (stopping_)
        return;
      armed_ = false;
      polled.clear();
      for (int fd : fds_)
        if (fd >= 0)
          polled.push_back({fd, POLLIN, 0});
    }
    polled.push_back({stop_fd_, POLLIN, 0});
    int rc;
    do
      rc = ::poll(polled.data(), polled.size(), static_cast<int>(fallback_.count()));
    while (rc < 0 && errno == EINTR);
    if (polled.back().revents != 0)
      return;  // stopping
    on_ready_();
  }
}

}  // namespace solstice
