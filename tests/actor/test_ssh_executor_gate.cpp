// The console hand-off in the types and at run time: the real SSH executor
// refuses every guest-shell request until the VM attempt releases it, so no
// exec can run while the console tailer may still log the guest's output.
#include <doctest/doctest.h>

#include <chrono>
#include <optional>
#include <string>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include "actors/actors.hpp"
#include "actors/runner_types.hpp"
#include "actors/vm/ssh_executor.hpp"

namespace {

using namespace solstice;
using namespace std::chrono_literals;

struct gate_config : caf::actor_system_config {
  gate_config() {
    add_runner_types(*this);
    set("scheduler.policy", caf::atom("testing"));
  }
};

struct reply {
  std::optional<v1::StepResult> result;
  std::optional<caf::error> error;
};

// Sends one exec to the executor through the guest-shell interface and keeps
// the reply.
caf::behavior exec_client(caf::event_based_actor* self, guest_shell_actor shell, reply* out) {
  self->request(shell, 30s, exec_atom::value, uint32_t{0}, std::string{"echo hi"},
                std::string{}, uint32_t{1000})
    .then([out](v1::StepResult& r) { out->result = r; },
          [out](caf::error& err) { out->error = err; });
  return {};
}

output_observer_actor::behavior_type silent_observer(output_observer_actor::pointer) {
  return {[](output_atom, const v1::OutputChunk&) {}};
}

struct gate_fixture {
  gate_config cfg;
  caf::actor_system sys{cfg};
  caf::scheduler::test_coordinator& sched{
    dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler())};
  output_observer_actor observer = sys.spawn(silent_observer);
  ssh_executor_actor executor = sys.spawn(ssh_executor, observer);

  // Runs until `done` holds; the executor's worker thread answers from outside
  // the scheduler, so idle rounds wait a little for it.
  template <class Done>
  void run_until(Done done) {
    for (int i = 0; i < 500 && !done(); ++i) {
      sched.run();
      if (!done())
        std::this_thread::sleep_for(10ms);
    }
  }

  ~gate_fixture() {
    caf::anon_send_exit(executor, caf::exit_reason::kill);
    caf::anon_send_exit(observer, caf::exit_reason::kill);
    while (sched.has_job() || sched.has_pending_timeout()) {
      sched.run();
      sched.trigger_timeouts();
    }
  }
};

}  // namespace

TEST_CASE_FIXTURE(gate_fixture, "an exec before the hand-off's release is refused, never run") {
  reply before;
  sys.spawn(exec_client, guest_shell_actor{executor}, &before);
  sched.run();
  // Refused at once by the actor itself: nothing went to the worker (which
  // would answer "SSH is not ready" from its thread).
  REQUIRE(before.error.has_value());
  CHECK(*before.error == runner_errc::not_released);
  CHECK(error_text(*before.error).find("exec refused") != std::string::npos);
  CHECK_FALSE(before.result.has_value());

  // Released: the same request now reaches the worker, which has no session.
  caf::anon_send(executor, release_atom::value);
  sched.run();
  reply after;
  sys.spawn(exec_client, guest_shell_actor{executor}, &after);
  run_until([&] { return after.error.has_value() || after.result.has_value(); });
  REQUIRE(after.error.has_value());
  CHECK(*after.error == runner_errc::ssh_failed);
  CHECK(error_text(*after.error).find("not ready") != std::string::npos);
}
