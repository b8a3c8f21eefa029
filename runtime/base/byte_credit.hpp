#pragma once
// Flow control between a producer thread and its consumer: the producer takes
// credit for the bytes it hands over and blocks while `limit` bytes are still
// unacknowledged, so a flood of output never piles up in memory.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace solstice {

class ByteCredit {
 public:
  explicit ByteCredit(size_t limit) : limit_(limit) {}

  // Blocks until `bytes` more fit (a single chunk larger than the limit passes
  // alone), `cancel` becomes true or `deadline` passes. Returns false when
  // cancelled or past the deadline: the bytes are then counted as taken anyway
  // (they are handed over, not lost), and the producer stops soon after.
  bool take(size_t bytes, const std::atomic<bool>& cancel,
            std::chrono::steady_clock::time_point deadline =
              std::chrono::steady_clock::time_point::max());
  // The consumer has handled `bytes`.
  void give_back(size_t bytes);
  size_t in_flight() const;
  // How often take() had to wait for credit and for how long in all, since
  // the credit was made (diagnostics: did the consumer pace the producer?).
  struct Waits {
    uint64_t count = 0;
    std::chrono::microseconds total{0};
  };
  Waits waits() const;

 private:
  const size_t limit_;
  mutable std::mutex mutex_;
  std::condition_variable freed_;
  size_t in_flight_ = 0;
  Waits waits_;
};

}  // namespace solstice
