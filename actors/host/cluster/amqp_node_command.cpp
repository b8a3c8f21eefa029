// `solstice-runner node --amqp URL`: takes jobs from a durable AMQP queue and runs
// them through the same runner_node actor as a coordinator's node. The blocking
// rabbitmq-c connection lives on this command's own thread (never a scheduler
// thread); jobs and their events cross to the actors through a scoped actor and
// an event outbox.
//
// A job is acknowledged only once its result is confirmed by the broker, so a
// node that dies mid-job leaves it to the broker, which delivers it again.
#include <map>
#include <memory>
#include <optional>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/system_messages.hpp>

#include "actors/cluster/event_outbox.hpp"
#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

// A delivered job while it runs here.
struct RunningJob {
  uint64_t delivery_tag = 0;
  bool redelivered = false;
  std::string correlation_id;
};

// What the broker's confirm of one publish lets happen next.
struct AwaitedConfirm {
  enum class Then { ack_delivery, nothing } then = Then::nothing;
  uint64_t delivery_tag = 0;
};

enum class Phase { serving, stopping };

class AmqpNode {
 public:
  AmqpNode(caf::actor_system& sys, amqp::Client& client, const amqp::Names& names,
           runner_node_actor node, std::shared_ptr<EventOutbox> outbox, std::string node_name)
      : sys_(sys), client_(client), names_(names), node_(std::move(node)),
        outbox_(std::move(outbox)), node_name_(std::move(node_name)), self_(sys) {
    self_->monitor(node_);
  }

  // Serves until a termination signal (then the node's jobs are cancelled and
  // left to the broker) or until the connection fails.
  int run(BlockedSignals& signals, const caf::actor& sink) {
    for (;;) {
      auto frame = client_.next(50ms);
      if (!frame)
        return lose_connection(frame.error().message);
      if (auto* delivery = std::get_if<amqp::Delivery>(&*frame))
        take(*delivery, sink);
      else if (auto* confirm = std::get_if<amqp::Confirm>(&*frame))
        settle(*confirm);
      if (auto problem = publish_outbox(); !problem.empty())
        return lose_connection(problem);
      if (signals.next_signal(0ms) && phase_ == Phase::serving) {
        say("solstice-runner: %s\n", "node shutting down: its jobs are cancelled and left to "
                                     "the broker for another node");
        phase_ = Phase::stopping;
        self_->send(node_, stop_atom::value);
      }
      if (node_gone() && awaited_.empty())
        return phase_ == Phase::stopping ? 0 : exit_infrastructure_error;
    }
  }

 private:
  bool node_gone() {
    self_->receive([&](caf::down_msg&) { node_down_ = true; }, caf::after(0ms) >> [] {});
    return node_down_;
  }

  // A delivery: a valid job starts on the node; anything else is poison.
  void take(const amqp::Delivery& delivery, const caf::actor& sink) {
    if (phase_ == Phase::stopping) {
      (void)client_.reject(delivery.tag, true);
      return;
    }
    auto job = parse_job_json(delivery.body, "message", {});
    if (!job)
      return dead_letter(delivery, job.error().message);
    if (job->id().empty())
      job->set_id(make_job_id());
    std::string refused;
    self_->request(node_, std::chrono::milliseconds(60s), run_job_atom::value, *job,
                   caf::actor_cast<event_sink_actor>(sink))
      .receive([](ok_atom) {}, [&](caf::error& err) { refused = error_text(err); });
    if (!refused.empty())
      return dead_letter(delivery, refused);
    running_[job->id()] =
      RunningJob{delivery.tag, delivery.redelivered,
                 delivery.correlation_id.empty() ? job->id() : delivery.correlation_id};
    std::printf("job %s taken%s\n", job->id().c_str(), delivery.redelivered ? " (redelivered)" : "");
    std::fflush(stdout);
  }

  // Not a job: copied to the dead-letter queue with the reason, then
  // acknowledged once the copy is confirmed (never requeued).
  void dead_letter(const amqp::Delivery& delivery, const std::string& reason) {
    say("solstice-runner: a message is not a valid job, moved to the dead-letter queue: %s\n",
        reason);
    amqp::Message copy;
    copy.exchange = "";
    copy.routing_key = names_.dead_letter_queue;
    copy.body = delivery.body;
    copy.headers = delivery.headers;
    copy.headers["x-solstice-reason"] = reason;
    copy.headers["x-solstice-node"] = node_name_;
    copy.correlation_id = delivery.correlation_id;
    auto seq = client_.publish(copy);
    if (!seq) {
      (void)client_.reject(delivery.tag, false);  // the queue's own dead-lettering
      return;
    }
    awaited_[*seq] = AwaitedConfirm{AwaitedConfirm::Then::ack_delivery, delivery.tag};
  }

  // Publishes the events the node's jobs produced; a result goes to the results
  // exchange, and its job is acknowledged once the broker confirms it.
  std::string publish_outbox() {
    for (auto& event : outbox_->take_all()) {
      auto i = running_.find(event.job_id());
      if (i == running_.end())
        continue;
      const auto key = amqp::job_routing_key(event.job_id());
      std::map<std::string, std::string> headers{{"x-solstice-node", node_name_}};
      if (i->second.redelivered)
        headers["x-solstice-redelivered"] = "true";
      if (!event.has_result()) {
        auto published = client_.publish(amqp::Message{names_.events_exchange, key,
                                                        event_to_json_line(event), headers,
                                                        i->second.correlation_id, false});
        if (!published)
          return published.error().message;
        continue;
      }
      auto& result = *event.mutable_result();
      if (phase_ == Phase::stopping && result.status() == v1::CANCELLED) {
        // Cancelled by this node's shutdown, not by anyone who asked for the
        // job: the broker gives it to another node.
        (void)client_.reject(i->second.delivery_tag, true);
        running_.erase(i);
        continue;
      }
      result.set_redelivered(i->second.redelivered);
      auto published = client_.publish(amqp::Message{names_.results_exchange, key,
                                                     message_to_json(result), headers,
                                                     i->second.correlation_id, true});
      if (!published)
        return published.error().message;
      awaited_[*published] =
        AwaitedConfirm{AwaitedConfirm::Then::ack_delivery, i->second.delivery_tag};
      running_.erase(i);
    }
    return {};
  }

  // The broker confirmed (or refused) publishes: the jobs they answer are
  // acknowledged (or given back to the queue to run again).
  void settle(const amqp::Confirm& confirm) {
    for (auto i = awaited_.begin(); i != awaited_.end();) {
      if (i->first > confirm.tag || (!confirm.multiple && i->first != confirm.tag)) {
        ++i;
        continue;
      }
      if (i->second.then == AwaitedConfirm::Then::ack_delivery) {
        if (confirm.ack)
          (void)client_.ack(i->second.delivery_tag);
        else
          (void)client_.reject(i->second.delivery_tag, true);
      }
      i = awaited_.erase(i);
    }
  }

  // Without its connection the node cannot acknowledge anything: the broker
  // gives its unacknowledged jobs to other nodes, so its own are cancelled.
  int lose_connection(const std::string& why) {
    say("solstice-runner: %s\n", "lost the AMQP broker (" + why +
                                   "); this node's jobs are cancelled (the broker delivers "
                                   "them again)");
    self_->send(node_, stop_atom::value);
    auto deadline = std::chrono::steady_clock::now() + 2min;
    while (!node_gone() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(100ms);
    return exit_infrastructure_error;
  }

  caf::actor_system& sys_;
  amqp::Client& client_;
  const amqp::Names& names_;
  runner_node_actor node_;
  std::shared_ptr<EventOutbox> outbox_;
  std::string node_name_;
  caf::scoped_actor self_;
  Phase phase_ = Phase::serving;
  bool node_down_ = false;
  std::map<std::string, RunningJob> running_;     // by job id
  std::map<uint64_t, AwaitedConfirm> awaited_;    // by publish sequence number
};

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
  auto client = amqp::Client::connect(*endpoint, 30s);
  if (!client) {
    say("solstice-runner: %s\n", client.error().message);
    return exit_infrastructure_error;
  }
  const auto& names = options.amqp.names;
  auto declared = (*client)->declare(names);
  auto consuming = declared ? (*client)->consume(names.jobs_queue,
                                                 static_cast<uint16_t>(prepared->offer.slots))
                            : declared;
  if (!consuming) {
    say("solstice-runner: %s\n", consuming.error().message);
    return exit_infrastructure_error;
  }
  caf::actor_system_config cfg;
  add_runner_types(cfg);
  caf::actor_system sys{cfg};
  auto outbox = std::make_shared<EventOutbox>();
  auto sink = sys.spawn(event_outbox_sink, outbox);
  auto node = spawn_runner_node(sys, *prepared, true);
  std::printf("node %s takes jobs from queue %s: %u slot(s)\n", prepared->offer.name.c_str(),
              names.jobs_queue.c_str(), prepared->offer.slots);
  std::fflush(stdout);
  AmqpNode session{sys, **client, names, node, outbox, prepared->offer.name};
  int code = session.run(signals, caf::actor_cast<caf::actor>(sink));
  caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  return code;
}

}  // namespace solstice::cluster_cli
