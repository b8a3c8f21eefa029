// FdWaiter: wakes its owner once per readiness, waits for rearm, stops promptly.
#include <doctest/doctest.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "runtime/base/fd_waiter.hpp"

using namespace std::chrono_literals;
using solstice::FdWaiter;

namespace {

// Counts on_ready calls and lets the test wait for the next one.
struct Wakeups {
  std::mutex mutex;
  std::condition_variable changed;
  int count = 0;

  void on_ready() {
    std::lock_guard lock(mutex);
    ++count;
    changed.notify_all();
  }
  // Whether the count reached `n` within `limit`.
  bool reaches(int n, std::chrono::milliseconds limit) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, limit, [&] { return count >= n; });
  }
  int now() {
    std::lock_guard lock(mutex);
    return count;
  }
};

struct Pipe {
  int read_end = -1, write_end = -1;
  Pipe() {
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    read_end = fds[0];
    write_end = fds[1];
  }
  ~Pipe() {
    if (read_end >= 0) ::close(read_end);
    if (write_end >= 0) ::close(write_end);
  }
  void put(char c) { REQUIRE(::write(write_end, &c, 1) == 1); }
  char take() {
    char c = 0;
    REQUIRE(::read(read_end, &c, 1) == 1);
    return c;
  }
};

}  // namespace

TEST_CASE("FdWaiter wakes once per readiness and only polls again when rearmed") {
  Pipe pipe;
  Wakeups wakeups;
  FdWaiter waiter({pipe.read_end}, [&] { wakeups.on_ready(); }, 60s);

  // Nothing to read: no wake-up (the fallback is a minute away).
  CHECK_FALSE(wakeups.reaches(1, 200ms));

  pipe.put('a');
  REQUIRE(wakeups.reaches(1, 10s));
  // Still readable, but not rearmed: no second call.
  CHECK_FALSE(wakeups.reaches(2, 200ms));

  // The owner reads it and rearms: nothing is readable, so nothing happens...
  CHECK(pipe.take() == 'a');
  waiter.rearm();
  CHECK_FALSE(wakeups.reaches(2, 200ms));
  // ...until the next byte.
  pipe.put('b');
  REQUIRE(wakeups.reaches(2, 10s));
  CHECK(wakeups.now() == 2);

  // Rearmed on an fd that stays readable: woken again at once.
  waiter.rearm();
  REQUIRE(wakeups.reaches(3, 10s));
}

TEST_CASE("FdWaiter wakes on hang-up, on the fallback interval, and follows rearm's fd list") {
  SUBCASE("hang-up") {
    Pipe pipe;
    Wakeups wakeups;
    FdWaiter waiter({pipe.read_end}, [&] { wakeups.on_ready(); }, 60s);
    ::close(pipe.write_end);
    pipe.write_end = -1;
    CHECK(wakeups.reaches(1, 10s));
  }
  SUBCASE("fallback") {
    Pipe pipe;
    Wakeups wakeups;
    FdWaiter waiter({pipe.read_end}, [&] { wakeups.on_ready(); }, 50ms);
    REQUIRE(wakeups.reaches(1, 10s));
    waiter.rearm();
    CHECK(wakeups.reaches(2, 10s));
  }
  SUBCASE("rearm with other fds") {
    Pipe first, second;
    Wakeups wakeups;
    FdWaiter waiter({first.read_end}, [&] { wakeups.on_ready(); }, 60s);
    first.put('x');
    REQUIRE(wakeups.reaches(1, 10s));
    // From now on only the second pipe counts: the first stays readable.
    waiter.rearm({second.read_end});
    CHECK_FALSE(wakeups.reaches(2, 200ms));
    second.put('y');
    CHECK(wakeups.reaches(2, 10s));
  }
}

TEST_CASE("FdWaiter stops at once while it waits, and never calls back after") {
  Pipe pipe;
  Wakeups wakeups;
  auto started = std::chrono::steady_clock::now();
  {
    FdWaiter waiter({pipe.read_end}, [&] { wakeups.on_ready(); }, 60s);
    std::this_thread::sleep_for(50ms);  // it is blocked in poll now
  }
  // Well under the minute the poll would otherwise last.
  CHECK(std::chrono::steady_clock::now() - started < 30s);
  pipe.put('z');
  std::this_thread::sleep_for(100ms);
  CHECK(wakeups.now() == 0);
}
