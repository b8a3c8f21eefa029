#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "runtime/base/byte_credit.hpp"

using namespace solstice;
using namespace std::chrono_literals;

TEST_SUITE("byte_credit") {
  TEST_CASE("the producer blocks at the limit until the consumer gives credit back") {
    ByteCredit credit{100};
    std::atomic<bool> cancel{false};
    CHECK(credit.take(60, cancel));
    CHECK(credit.take(40, cancel));
    std::atomic<bool> third_taken{false};
    std::thread producer([&] {
      credit.take(10, cancel);
      third_taken = true;
    });
    std::this_thread::sleep_for(100ms);
    CHECK_FALSE(third_taken.load());
    credit.give_back(60);
    producer.join();
    CHECK(third_taken.load());
    CHECK(credit.in_flight() == 50);
    // Counted: the first two took credit at once, the third waited ~100 ms.
    CHECK(credit.waits().count == 1);
    CHECK(credit.waits().total >= 90ms);
  }

  TEST_CASE("a chunk larger than the limit passes alone") {
    ByteCredit credit{10};
    std::atomic<bool> cancel{false};
    CHECK(credit.take(1000, cancel));
    CHECK(credit.in_flight() == 1000);
  }

  TEST_CASE("cancel releases a blocked producer") {
    ByteCredit credit{10};
    std::atomic<bool> cancel{false};
    CHECK(credit.take(10, cancel));
    std::atomic<int> result{-1};
    std::thread producer([&] { result = credit.take(5, cancel) ? 1 : 0; });
    std::this_thread::sleep_for(60ms);
    CHECK(result.load() == -1);
    cancel = true;
    producer.join();
    CHECK(result.load() == 0);
  }

  // A step's timeout must fire while its output is held: the producer (the SSH
  // worker) gives up waiting at the step's deadline and then stops the command.
  TEST_CASE("a deadline releases a blocked producer, counting its bytes as handed over") {
    ByteCredit credit{10};
    std::atomic<bool> cancel{false};
    CHECK(credit.take(10, cancel));
    auto started = std::chrono::steady_clock::now();
    CHECK_FALSE(credit.take(5, cancel, started + 200ms));
    auto waited = std::chrono::steady_clock::now() - started;
    CHECK(waited >= 200ms);
    CHECK(waited < 5s);
    CHECK(credit.in_flight() == 15);
    credit.give_back(15);
    CHECK(credit.in_flight() == 0);
  }
}
