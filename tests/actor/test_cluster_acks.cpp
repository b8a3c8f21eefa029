// The acknowledgement of a job's output travels through the cluster's actors, on
// CAF's deterministic scheduler: a runner node answers its supervisor's output
// event only when the node's sink has answered it, and the coordinator answers a
// relayed output event only when the submitter has; a submitter that does not
// answer within the window is asked again with a repeat, and its answer (late,
// after the first request's timeout) still releases the output.
#include <doctest/doctest.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/exit_reason.hpp>
#include <caf/response_promise.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/send.hpp>

#include "actors/actors.hpp"
#include "actors/cluster/coordinator.hpp"
#include "actors/cluster/runner_node.hpp"
#include "actors/runner_types.hpp"

namespace {

using namespace solstice;
using namespace std::chrono_literals;

struct acks_config : caf::actor_system_config {
  acks_config() {
    add_runner_types(*this);
    set("scheduler.policy", caf::atom("testing"));
  }
};

// A sink that answers nothing until it is told to (`ok_atom`, from the test):
// what a submitter whose terminal is not read does. Its promises are delivered
// by the sink itself (a promise needs its actor's context).
struct held_sink {
  std::vector<v1::JobEvent> events;
  std::vector<caf::response_promise> unanswered;
};

caf::behavior holding_sink(caf::event_based_actor* self, std::shared_ptr<held_sink> held) {
  return {
    [self, held](event_atom, v1::JobEvent& event) -> caf::result<void> {
      held->events.push_back(event);
      if (!self->current_mailbox_element()->mid.is_request())
        return caf::unit;
      auto promise = self->make_response_promise();
      held->unanswered.push_back(promise);
      return promise;
    },
    [held](ok_atom) {
      for (auto& promise : held->unanswered)
        promise.deliver(caf::unit);
      held->unanswered.clear();
    },
  };
}

// Stands in for whatever sends output to a sink (a supervisor, a node): it
// sends output event `sequence` as a request and counts the answers.
struct producer_log {
  std::vector<uint64_t> answered;
  std::vector<std::string> other;  // replies to other requests, or errors
};

v1::JobEvent output_event(const std::string& job_id, uint64_t sequence) {
  v1::JobEvent event;
  event.set_job_id(job_id);
  event.set_sequence(sequence);
  event.mutable_output()->set_step_index(0);
  event.mutable_output()->set_stream(v1::STDOUT);
  event.mutable_output()->set_data("chunk " + std::to_string(sequence) + "\n");
  return event;
}

struct acks_fixture {
  acks_config cfg;
  caf::actor_system sys{cfg};
  caf::scheduler::test_coordinator& sched;
  std::vector<caf::actor> actors;

  acks_fixture() : sched(dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler())) {}

  ~acks_fixture() {
    for (auto& actor : actors)
      caf::anon_send_exit(actor, caf::exit_reason::kill);
    while (sched.has_job() || sched.has_pending_timeout()) {
      sched.run();
      sched.trigger_timeouts();
    }
  }

  template <class Handle>
  Handle keep(Handle handle) {
    actors.push_back(caf::actor_cast<caf::actor>(handle));
    return handle;
  }

  void drive() {
    for (size_t n = 0; sched.has_job(); ++n) {
      REQUIRE_MESSAGE(n < 100000, "the actors never went idle");
      sched.run_once();
    }
  }

  // An actor that sends `event` as a request to `to` whenever told, logging answers.
  caf::actor producer(event_sink_actor to, std::shared_ptr<producer_log> log) {
    return keep(sys.spawn([to, log](caf::event_based_actor* self) -> caf::behavior {
      return {
        [self, to, log](v1::JobEvent& event) {
          auto sequence = event.sequence();
          self->request(to, caf::infinite, event_atom::value, std::move(event))
            .then([log, sequence]() { log->answered.push_back(sequence); },
                  [log](caf::error& err) { log->other.push_back(error_text(err)); });
        },
      };
    }));
  }
};

}  // namespace

TEST_CASE_FIXTURE(acks_fixture, "a runner node answers its supervisor's output only once its "
                                "sink has answered it, and passes other events straight on") {
  auto held = std::make_shared<held_sink>();
  auto sink_actor = keep(sys.spawn(holding_sink, held));
  auto sink = caf::actor_cast<event_sink_actor>(sink_actor);
  auto fake_supervisor = keep(sys.spawn([]() -> job_supervisor_actor::behavior_type {
    return {[](start_atom) {}, [](cancel_atom) {}};
  }));
  auto recorder = keep(sys.spawn(holding_sink, std::make_shared<held_sink>()));
  job_launcher launcher = [&](caf::actor_system&, const v1::JobSpec&,
                              event_sink_actor) -> Result<launched_job> {
    return launched_job{caf::actor_cast<job_supervisor_actor>(fake_supervisor),
                        caf::actor_cast<event_sink_actor>(recorder)};
  };
  auto node = keep(sys.spawn(runner_node, std::string{"node-1"}, uint32_t{1}, launcher));
  v1::JobSpec spec;
  spec.set_id("job-1");
  spec.add_steps()->set_script("true");
  auto starter = keep(sys.spawn([=](caf::event_based_actor* self) {
    self->request(node, caf::infinite, run_job_atom::value, spec, sink).then([](ok_atom) {});
  }));
  drive();

  auto log = std::make_shared<producer_log>();
  auto supervisor_side = producer(caf::actor_cast<event_sink_actor>(node), log);
  for (uint64_t i = 0; i < 3; ++i)
    caf::anon_send(supervisor_side, output_event("job-1", i));
  drive();
  REQUIRE(held->events.size() == 3);
  CHECK(log->answered.empty());

  // Time passes: a local sink has no window, nothing is released by a timeout.
  sched.advance_time(output_ack_window + 5s);
  sched.trigger_timeouts();
  drive();
  CHECK(log->answered.empty());
  CHECK(held->events.size() == 3);

  // A state change is no request: it goes straight on, in order.
  v1::JobEvent state;
  state.set_job_id("job-1");
  state.set_sequence(3);
  state.mutable_state()->set_state(v1::RUNNING);
  caf::anon_send(caf::actor_cast<caf::actor>(node), event_atom::value, state);
  drive();
  REQUIRE(held->events.size() == 4);
  CHECK(held->events[3].has_state());

  caf::anon_send(sink_actor, ok_atom::value);
  drive();
  CHECK(log->answered == std::vector<uint64_t>{0, 1, 2});
  CHECK(log->other.empty());
  (void)starter;
}

TEST_CASE_FIXTURE(acks_fixture, "the coordinator answers a node's output once its submitter "
                                "has, asking again with a repeat past the window") {
  coordinator_options options;
  options.ack_window = 2s;
  auto coordinator = keep(sys.spawn(solstice::coordinator, options));
  auto held = std::make_shared<held_sink>();
  auto submitter_actor = keep(sys.spawn(holding_sink, held));
  auto submitter_sink = caf::actor_cast<event_sink_actor>(submitter_actor);

  // A node that runs nothing: it keeps the relay of the job dispatched to it.
  auto relay = std::make_shared<event_sink_actor>();
  auto fake_node = keep(sys.spawn([relay]() -> runner_node_actor::behavior_type {
    return {
      [relay](run_job_atom, const v1::JobSpec&, event_sink_actor sink) {
        *relay = std::move(sink);
        return ok_atom::value;
      },
      [](cancel_atom, const std::string&) {},
      [](stop_atom) {},
      [](event_atom, v1::JobEvent&) {},
    };
  }));
  node_offer offer;
  offer.name = "node-1";
  v1::JobSpec spec;
  spec.set_id("job-1");
  spec.add_steps()->set_script("true");
  auto client = keep(sys.spawn([=](caf::event_based_actor* self) {
    self->request(coordinator, caf::infinite, join_atom::value, offer, fake_node)
      .then([=](ok_atom) {
        self->request(coordinator, caf::infinite, submit_atom::value, spec, submitter_sink)
          .then([](const std::string&) {});
      });
  }));
  drive();
  REQUIRE(*relay);
  auto before = held->events.size();  // queued, dispatched notices
  caf::anon_send(submitter_actor, ok_atom::value);  // plain messages: nothing to answer
  drive();

  auto log = std::make_shared<producer_log>();
  auto node_side = producer(*relay, log);
  caf::anon_send(node_side, output_event("job-1", 0));
  caf::anon_send(node_side, output_event("job-1", 1));
  drive();
  REQUIRE(held->events.size() == before + 2);
  CHECK(held->events[before].output().data() == "chunk 0\n");
  CHECK(log->answered.empty());

  // Past the window the submitter is asked again: a repeat, no payload, of each.
  sched.advance_time(2s);
  sched.trigger_timeouts();
  drive();
  REQUIRE(held->events.size() == before + 4);
  CHECK(held->events[before + 2].kind_case() == v1::JobEvent::KIND_NOT_SET);
  CHECK(held->events[before + 2].sequence() == held->events[before].sequence());
  CHECK(log->answered.empty());

  // The node asks again too (a repeat of output already relayed): answered with it.
  caf::anon_send(node_side, repeat_of(output_event("job-1", 0)));
  drive();
  CHECK(held->events.size() == before + 4);  // not relayed a second time

  // The submitter reads again: its late answers release the output, in order.
  caf::anon_send(submitter_actor, ok_atom::value);
  drive();
  // Output 0 and the node's repeat of it are answered together, then output 1.
  CHECK(log->answered == std::vector<uint64_t>{0, 0, 1});
  CHECK(log->other.empty());
  (void)client;
}

TEST_CASE_FIXTURE(acks_fixture, "a job a busy node refuses goes back to the queue, no attempt "
                                "spent, and is dispatched again on the next tick") {
  coordinator_options options;
  options.tick_interval = 1s;
  auto coordinator = keep(sys.spawn(solstice::coordinator, options));
  auto held = std::make_shared<held_sink>();
  auto submitter_actor = keep(sys.spawn(holding_sink, held));
  auto submitter_sink = caf::actor_cast<event_sink_actor>(submitter_actor);

  // A node that still counts a finished job's slot the first time it is asked
  // (its supervisor has not gone yet), and takes the job the second time.
  auto asked = std::make_shared<int>(0);
  auto fake_node = keep(sys.spawn([asked]() -> runner_node_actor::behavior_type {
    return {
      [asked](run_job_atom, const v1::JobSpec&, event_sink_actor) -> caf::result<ok_atom> {
        if (++*asked == 1)
          return caf::make_error(runner_errc::node_unavailable,
                                 "node node-1 is busy (1 of 1 slots used)");
        return ok_atom::value;
      },
      [](cancel_atom, const std::string&) {},
      [](stop_atom) {},
      [](event_atom, v1::JobEvent&) {},
    };
  }));
  node_offer offer;
  offer.name = "node-1";
  offer.slots = 1;
  v1::JobSpec spec;
  spec.set_id("job-1");
  spec.add_steps()->set_script("true");
  auto client = keep(sys.spawn([=](caf::event_based_actor* self) {
    self->request(coordinator, caf::infinite, join_atom::value, offer, fake_node)
      .then([=](ok_atom) {
        self->request(coordinator, caf::infinite, submit_atom::value, spec, submitter_sink)
          .then([](const std::string&) {});
      });
  }));
  drive();
  REQUIRE(*asked == 1);
  auto said = [&](const std::string& text) {
    for (auto& event : held->events)
      if (event.has_notice() && event.notice().message().find(text) != std::string::npos)
        return true;
    return false;
  };
  for (auto& event : held->events)
    CHECK_FALSE(event.has_result());  // not ended as an infrastructure error
  CHECK(said("did not take the job yet"));

  sched.advance_time(1s);
  sched.trigger_timeouts();
  drive();
  CHECK(*asked == 2);
  for (auto& event : held->events)
    CHECK_FALSE(event.has_result());
  CHECK(said("dispatched to node node-1 (attempt 1 of 1)"));
  (void)client;
}
