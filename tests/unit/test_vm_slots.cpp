#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "runtime/vm/vm_slots.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
namespace fs = std::filesystem;

using TempStateDir = solstice::test::TempDir;

TEST_SUITE("vm_slots") {
  TEST_CASE("at most max slots are held; a released slot can be taken again") {
    TempStateDir state;
    auto a = VmSlot::try_acquire(state.path, 2);
    auto b = VmSlot::try_acquire(state.path, 2);
    REQUIRE(a);
    REQUIRE(b);
    REQUIRE(a->has_value());
    REQUIRE(b->has_value());
    CHECK((*a)->index() != (*b)->index());
    auto c = VmSlot::try_acquire(state.path, 2);
    REQUIRE(c);
    CHECK_FALSE(c->has_value());
    a->reset();
    auto d = VmSlot::try_acquire(state.path, 2);
    REQUIRE(d);
    CHECK(d->has_value());
    CHECK((fs::status(state.path / "slots").permissions() & fs::perms::all) ==
          fs::perms::owner_all);
  }

  TEST_CASE("the start slots are a pool of their own") {
    TempStateDir state;
    auto vm = VmSlot::try_acquire(state.path, 1);
    REQUIRE(vm);
    REQUIRE(vm->has_value());
    auto start = VmSlot::try_acquire(state.path, 1, VmSlot::start_pool);
    REQUIRE(start);
    REQUIRE(start->has_value());
    auto second = VmSlot::try_acquire(state.path, 1, VmSlot::start_pool);
    REQUIRE(second);
    CHECK_FALSE(second->has_value());
    CHECK(fs::exists(state.path / "start-slots" / "0.lock"));
    start->reset();
    auto again = VmSlot::try_acquire(state.path, 1, VmSlot::start_pool);
    REQUIRE(again);
    CHECK(again->has_value());
  }

  TEST_CASE("slots are shared between processes and freed when the holder dies") {
    TempStateDir state;
    int ready[2];
    REQUIRE(::pipe(ready) == 0);
    pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      auto slot = VmSlot::try_acquire(state.path, 1);
      char ok = slot && slot->has_value() ? 'y' : 'n';
      (void)!::write(ready[1], &ok, 1);
      ::pause();
      ::_exit(0);
    }
    char ok = 0;
    REQUIRE(::read(ready[0], &ok, 1) == 1);
    CHECK(ok == 'y');
    auto taken = VmSlot::try_acquire(state.path, 1);
    REQUIRE(taken);
    CHECK_FALSE(taken->has_value());
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    auto freed = VmSlot::try_acquire(state.path, 1);
    REQUIRE(freed);
    CHECK(freed->has_value());
    ::close(ready[0]);
    ::close(ready[1]);
  }
}
