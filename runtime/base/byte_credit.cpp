#include "runtime/base/byte_credit.hpp"

#include <chrono>

namespace solstice {

bool ByteCredit::take(size_t bytes, const std::atomic<bool>& cancel,
                      std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock{mutex_};
  bool granted = true;
  const bool waits = in_flight_ > 0 && in_flight_ + bytes > limit_;
  const auto since = waits ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  while (in_flight_ > 0 && in_flight_ + bytes > limit_) {
    if (cancel.load() || std::chrono::steady_clock::now() >= deadline) {
      granted = false;
      break;
    }
    // Wake up now and then to notice a cancel flag nobody notifies about.
    freed_.wait_for(lock, std::chrono::milliseconds(50));
  }
  if (waits) {
    ++waits_.count;
    waits_.total += std::chrono::duration_cast<std::chrono::microseconds>(
      std::chrono::steady_clock::now() - since);
  }
  in_flight_ += bytes;
  return granted;
}

void ByteCredit::give_back(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock{mutex_};
    in_flight_ = bytes > in_flight_ ? 0 : in_flight_ - bytes;
  }
  freed_.notify_all();
}

ByteCredit::Waits ByteCredit::waits() const {
  std::lock_guard<std::mutex> lock{mutex_};
  return waits_;
}

size_t ByteCredit::in_flight() const {
  std::lock_guard<std::mutex> lock{mutex_};
  return in_flight_;
}

}  // namespace solstice
