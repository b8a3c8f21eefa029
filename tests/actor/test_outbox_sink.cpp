// The AMQP node's event sink on CAF's deterministic scheduler: every event goes
// into the outbox at once and in order, but an output request is answered only
// while the output held between the guest and the broker is under the bound, so
// a broker that pushes back holds the job's output at its source.
#include <doctest/doctest.h>

#include <poll.h>

#include <memory>
#include <string>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/send.hpp>

#include "actors/actors.hpp"
#include "actors/cluster/event_outbox.hpp"
#include "actors/runner_types.hpp"

namespace {

using namespace solstice;

struct sink_test_config : caf::actor_system_config {
  sink_test_config() {
    add_runner_types(*this);
    set("scheduler.policy", caf::atom("testing"));
  }
};

v1::JobEvent output_event(uint64_t sequence, size_t bytes) {
  v1::JobEvent event;
  event.set_job_id("held");
  event.set_sequence(sequence);
  event.mutable_output()->set_sequence(sequence);
  event.mutable_output()->set_data(std::string(bytes, 'x'));
  return event;
}

v1::JobEvent state_event(uint64_t sequence) {
  v1::JobEvent event;
  event.set_job_id("held");
  event.set_sequence(sequence);
  event.mutable_state()->set_state(v1::RUNNING);
  return event;
}

}  // namespace

TEST_CASE("outbox sink: output requests are answered only while the outbox has room") {
  sink_test_config cfg;
  caf::actor_system sys{cfg};
  auto& sched = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
  auto outbox = std::make_shared<EventOutbox>(100);
  auto sink = sys.spawn(event_outbox_sink, outbox);
  // Stands for the job supervisor: sends each event as a request, counts answers.
  auto answers = std::make_shared<int>(0);
  auto supervisor = sys.spawn([=](caf::event_based_actor* self) -> caf::behavior {
    return {[=](event_atom, v1::JobEvent& event) {
      self->request(caf::actor_cast<event_sink_actor>(sink), caf::infinite, event_atom::value,
                    event)
        .then([=]() { ++*answers; }, [](caf::error&) {});
    }};
  });
  auto emit = [&](v1::JobEvent event) {
    caf::anon_send(supervisor, event_atom::value, std::move(event));
    sched.run();
  };

  CHECK(outbox->take_peak_held_bytes() == 0);
  emit(output_event(0, 60));
  CHECK(*answers == 1);  // 60 of 100 bytes held: answered at once
  CHECK(outbox->flow_counts().answers_held == 0);
  emit(output_event(1, 60));
  CHECK(*answers == 1);  // 120 held: no room, the answer waits
  emit(state_event(2));
  CHECK(*answers == 2);  // not output: never held back
  sched.trigger_timeouts();
  sched.run();
  CHECK(*answers == 2);  // looked again: still no room

  // Every event is in the outbox already, in order.
  auto taken = outbox->take_all();
  REQUIRE(taken.size() == 3);
  CHECK(taken[0].sequence() == 0);
  CHECK(taken[1].sequence() == 1);
  CHECK(taken[2].has_state());
  CHECK(outbox->held_bytes() == 120);

  // The broker confirmed the first chunk: room again, the held answer goes out.
  outbox->release(60);
  sched.trigger_timeouts();
  sched.run();
  CHECK(*answers == 3);
  // Counted for the node's report: one answer held back, 120 bytes held at most
  // (then the peak starts again from what is held now).
  CHECK(outbox->flow_counts().answers_held == 1);
  CHECK(outbox->take_peak_held_bytes() == 120);
  CHECK(outbox->take_peak_held_bytes() == 60);
  // Answers leave in order and nothing is held any more: the next is at once.
  outbox->release(60);
  emit(output_event(3, 10));
  CHECK(*answers == 4);

  caf::anon_send_exit(supervisor, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  sched.run();
}

TEST_CASE("outbox sink: an output event sent without a request is only queued") {
  sink_test_config cfg;
  caf::actor_system sys{cfg};
  auto& sched = dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler());
  auto outbox = std::make_shared<EventOutbox>(10);
  auto sink = sys.spawn(event_outbox_sink, outbox);
  caf::anon_send(caf::actor_cast<event_sink_actor>(sink), event_atom::value, output_event(0, 50));
  caf::anon_send(caf::actor_cast<event_sink_actor>(sink), event_atom::value, output_event(1, 50));
  sched.run();
  CHECK(outbox->take_all().size() == 2);
  CHECK(outbox->held_bytes() == 100);
  CHECK_FALSE(outbox->has_room());
  caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  sched.run();
}

namespace {

bool readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

}  // namespace

TEST_CASE("outbox: its wake fd wakes the publishing loop for new events, for output only "
          "while the loop is not holding a batch") {
  EventOutbox outbox;
  const int fd = outbox.wake_fd();
  REQUIRE(fd >= 0);
  CHECK_FALSE(readable(fd));
  outbox.push(output_event(0, 10));
  CHECK(readable(fd));  // the loop wakes for the first event
  outbox.push(output_event(1, 10));
  CHECK(outbox.take_all().size() == 2);
  CHECK_FALSE(readable(fd));  // taken: the loop sleeps again

  // The loop holds a batch that may still grow: output does not wake it...
  outbox.wake_on_output(false);
  outbox.push(output_event(2, 10));
  CHECK_FALSE(readable(fd));
  // ...but any other event does (a state, a step, a result is never held).
  outbox.push(state_event(3));
  CHECK(readable(fd));
  CHECK(outbox.take_all().size() == 2);
  CHECK_FALSE(readable(fd));

  // Output that came while the loop did not listen wakes it once it listens again.
  outbox.push(output_event(4, 10));
  CHECK_FALSE(readable(fd));
  outbox.wake_on_output(true);
  CHECK(readable(fd));
  CHECK(outbox.take_all().size() == 1);
  CHECK_FALSE(readable(fd));
}
