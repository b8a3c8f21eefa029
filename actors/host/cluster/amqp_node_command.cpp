// `solstice-runner node --amqp URL`: takes jobs from a durable AMQP queue and runs
// them through the same runner_node actor as a coordinator's node. The blocking
// rabbitmq-c connection lives on this command's own thread (never a scheduler
// thread); jobs and their events cross to the actors through a scoped actor and
// an event outbox.
//
// A job is acknowledged only once its result is confirmed by the broker, so a
// node that dies mid-job leaves it to the broker, which delivers it again. A
// lost connection leaves the jobs running (amqp_node_jobs.hpp says how their
// events wait and what happens to their deliveries).
#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/system_messages.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster/event_outbox.hpp"
#include "actors/host/cluster/amqp_node_jobs.hpp"
#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_request.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

enum class Phase { serving, stopping };

// One connection's life: frames from the broker in, the jobs' events out,
// signals watched. Returns the exit code once the node is done, or nullopt when
// the connection failed (the jobs keep running; connect again).
class AmqpSession {
 public:
  AmqpSession(caf::actor_system& sys, amqp::Client& client, AmqpNodeJobs& jobs,
              const runner_node_actor& node, std::string jobs_queue, std::string consuming_line)
      : client_(client), jobs_(jobs), self_(sys), jobs_queue_(std::move(jobs_queue)),
        consuming_line_(std::move(consuming_line)) {
    self_->monitor(node);
  }

  std::optional<int> run(BlockedSignals& signals) {
    if (jobs_.prefetch_wanted() == 0)
      say("solstice-runner: %s\n", "every slot runs a job taken before the connection was lost: "
                                   "taking jobs from the queue again once one of them ends");
    for (;;) {
      if (auto taking = take_as_many_as_free_slots(); !taking)
        return lose_connection(taking.error().message);
      auto frame = client_.next(jobs_.next_look(), jobs_.wake_fd());
      if (!frame)
        return lose_connection(frame.error().message);
      if (auto* delivery = std::get_if<amqp::Delivery>(&*frame))
        jobs_.take(client_, *delivery);
      else if (auto* confirm = std::get_if<amqp::Confirm>(&*frame))
        jobs_.settle(client_, *confirm);
      else if (auto* blocked = std::get_if<amqp::Blocked>(&*frame))
        set_blocked(blocked->blocked);
      jobs_.start_waiting(client_);
      if (auto published = jobs_.publish(client_); !published)
        return lose_connection(published.error().message);
      if (signals.next_signal(0ms) && !jobs_.stopping()) {
        say("solstice-runner: %s\n", "node shutting down: its jobs are cancelled and left to "
                                     "the broker for another node");
        jobs_.stop();
      }
      // A result the node sent just before it quit may still be on its way
      // through the outbox: a few more rounds publish it.
      if (node_gone() && jobs_.drained() && ++rounds_since_node_gone_ > 4)
        return jobs_.stopping() ? 0 : exit_infrastructure_error;
    }
  }

 private:
  // After a reconnect the jobs of the lost connection still hold their slots but
  // no delivery on this one: the channel takes only as many deliveries as there
  // are free slots (raised as those jobs end), none while there are none, so
  // that the queue's other jobs go to nodes that can start them.
  Result<void> take_as_many_as_free_slots() {
    const auto wanted = jobs_.prefetch_wanted();
    if (wanted == 0 || wanted == prefetch_ || jobs_.stopping())
      return {};
    if (auto set = client_.set_channel_prefetch(wanted); !set)
      return set;
    prefetch_ = wanted;
    if (consuming_)
      return {};
    if (auto consuming = client_.consume(jobs_queue_, 0); !consuming)
      return consuming;
    consuming_ = true;
    std::printf("%s\n", consuming_line_.c_str());  // what the operator (and a test) waits for
    std::fflush(stdout);
    return {};
  }

  bool node_gone() {
    if (!node_down_)
      self_->receive([&](caf::down_msg&) { node_down_ = true; }, caf::after(0ms) >> [] {});
    return node_down_;
  }

  void set_blocked(bool blocked) {
    say("solstice-runner: %s\n", blocked ? "the broker blocks this node's publishing (a "
                                            "resource alarm): the jobs' output is held"
                                          : "the broker takes this node's publishing again");
    jobs_.set_blocked(blocked);
  }

  // The jobs keep running; their events wait for the next connection.
  std::optional<int> lose_connection(const std::string& why) {
    say("solstice-runner: %s\n", "lost the AMQP broker (" + why + "); " +
                                   std::to_string(jobs_.running()) +
                                   " job(s) keep running, their events wait; reconnecting");
    jobs_.connection_lost();
    if (node_gone())
      return jobs_.stopping() ? 0 : exit_infrastructure_error;
    return std::nullopt;
  }

  amqp::Client& client_;
  AmqpNodeJobs& jobs_;
  caf::scoped_actor self_;
  std::string jobs_queue_;
  std::string consuming_line_;  // said once the jobs queue is consumed
  bool consuming_ = false;
  uint16_t prefetch_ = 0;  // the channel's, as last set
  bool node_down_ = false;
  int rounds_since_node_gone_ = 0;
};

// A connection that declared the runner's names (the session consumes).
Result<std::unique_ptr<amqp::Client>> connect_and_declare(const amqp::Endpoint& endpoint,
                                                          const amqp::Names& names) {
  auto client = amqp::Client::connect(endpoint, 30s);
  if (!client)
    return client;
  if (auto declared = (*client)->declare(names); !declared)
    return tl::unexpected(declared.error());
  return client;
}

bool signal_within(BlockedSignals& signals, std::chrono::milliseconds wait) {
  auto until = std::chrono::steady_clock::now() + wait;
  while (std::chrono::steady_clock::now() < until)
    if (signals.next_signal(100ms))
      return true;
  return false;
}

// Stops the node between connections: its jobs end cancelled, their results
// unpublished (the broker gave their deliveries back to the queue already).
int stop_node(caf::actor_system& sys, const runner_node_actor& node, EventOutbox& outbox) {
  outbox.stop_holding();
  caf::scoped_actor self{sys};
  self->monitor(node);
  self->send(node, stop_atom::value);
  self->receive([](caf::down_msg&) {}, caf::after(2min) >> [&] {
    self->send_exit(node, caf::exit_reason::kill);
  });
  return 0;
}

}  // namespace

int amqp_node_command(const NodeOptions& options) {
  auto endpoint = amqp_endpoint(options.amqp);
  if (!endpoint) {
    say("solstice-runner: %s\n", endpoint.error().message);
    return exit_invalid_input;
  }
  auto prepared = prepare_node(options);
  if (!prepared) {
    say("solstice-runner: %s\n", prepared.error().message);
    return exit_invalid_input;
  }
  BlockedSignals signals;
  caf::actor_system_config cfg;
  add_runner_types(cfg);
  use_sleeping_scheduler(cfg);
  caf::actor_system sys{cfg};
  auto outbox = std::make_shared<EventOutbox>();
  auto sink = sys.spawn(event_outbox_sink, outbox);
  auto node = spawn_runner_node(sys, *prepared, true);
  const auto& names = options.amqp.names;
  const auto slots = static_cast<uint16_t>(prepared->offer.slots);
  auto finish = [&](int code) {
    caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
    return code;
  };
  AmqpNodeJobs jobs{sys,
                    names,
                    node,
                    outbox,
                    caf::actor_cast<event_sink_actor>(sink),
                    prepared->offer.name,
                    slots,
                    options.amqp_events_format == "json" ? EventsFormat::json_lines
                                                         : EventsFormat::protobuf};
  // Connects (again) with a growing back-off while the broker is unreachable.
  auto backoff = std::chrono::milliseconds(500ms);
  for (;;) {
    auto client = connect_and_declare(*endpoint, names);
    if (client) {
      backoff = 500ms;
      const auto consuming = "node " + prepared->offer.name + " takes jobs from queue " +
                             names.jobs_queue + ": " + std::to_string(slots) + " slot(s)";
      AmqpSession session{sys, **client, jobs, node, names.jobs_queue, consuming};
      if (auto code = session.run(signals))
        return finish(*code);
    } else {
      say("solstice-runner: %s\n",
          client.error().message + "; retrying in " + std::to_string(backoff.count()) + " ms");
    }
    if (signal_within(signals, backoff))
      return finish(stop_node(sys, node, *outbox));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30s));
  }
}

}  // namespace solstice::cluster_cli
