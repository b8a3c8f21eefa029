// `solstice-runner node --amqp URL`: takes jobs from a durable AMQP queue and runs
// them through the same runner_node actor as a coordinator's node. The blocking
// rabbitmq-c connection lives on this command's own thread (never a scheduler
// thread); jobs and their events cross to the actors through a scoped actor and
// an event outbox.
//
// A job is acknowledged only once its result is confirmed by the broker, so a
// node that dies mid-job leaves it to the broker, which delivers it again.
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
#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_request.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

// A delivered job while it runs here.
struct RunningJob {
  uint64_t delivery_tag = 0;
  bool redelivered = false;
  std::string correlation_id;
  // A solstice-ci jobrequest.v1 (answered as jobresult.v1); null for a JobSpec.
  nlohmann::json request;
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
  // left to the broker: the exit code) or until the connection fails (nullopt:
  // its jobs were cancelled; connect again).
  std::optional<int> run(BlockedSignals& signals, const caf::actor& sink) {
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
      // A result the node sent just before it quit may still be on its way
      // through the outbox: a few more rounds publish it.
      if (node_gone() && awaited_.empty() && ++rounds_since_node_gone_ > 4)
        return phase_ == Phase::stopping ? 0 : exit_infrastructure_error;
    }
  }

 private:
  bool node_gone() {
    if (node_down_)
      return true;
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
    auto document = nlohmann::json::parse(delivery.body, nullptr, false);
    running_[job->id()] =
      RunningJob{delivery.tag, delivery.redelivered,
                 delivery.correlation_id.empty() ? job->id() : delivery.correlation_id,
                 document.is_object() && is_job_request(document) ? document : nlohmann::json{}};
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
      const auto& request = i->second.request;
      headers["x-solstice-schema"] = request.is_null() ? "JobResult" : "jobresult.v1";
      auto published = client_.publish(amqp::Message{
        names_.results_exchange, key,
        request.is_null() ? message_to_json(result) : job_result_v1_json(request, result),
        headers, i->second.correlation_id, true});
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
  // gives its unacknowledged jobs to other nodes, so its own are cancelled (their
  // results dropped) before it connects again.
  std::optional<int> lose_connection(const std::string& why) {
    say("solstice-runner: %s\n", "lost the AMQP broker (" + why +
                                   "); this node's jobs are cancelled (the broker delivers "
                                   "them again), reconnecting");
    for (const auto& [job_id, job] : running_)
      self_->send(node_, cancel_atom::value, job_id);
    auto deadline = std::chrono::steady_clock::now() + 2min;
    while (!running_.empty() && !node_gone() && std::chrono::steady_clock::now() < deadline) {
      for (const auto& event : outbox_->take_all())
        if (event.has_result())
          running_.erase(event.job_id());
      std::this_thread::sleep_for(100ms);
    }
    if (node_down_)
      return exit_infrastructure_error;
    return std::nullopt;
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
  int rounds_since_node_gone_ = 0;
  std::map<std::string, RunningJob> running_;     // by job id
  std::map<uint64_t, AwaitedConfirm> awaited_;    // by publish sequence number
};

// A connection that declared the runner's names and consumes the jobs queue.
Result<std::unique_ptr<amqp::Client>> connect_and_consume(const amqp::Endpoint& endpoint,
                                                          const amqp::Names& names,
                                                          uint16_t slots) {
  auto client = amqp::Client::connect(endpoint, 30s);
  if (!client)
    return client;
  if (auto declared = (*client)->declare(names); !declared)
    return tl::unexpected(declared.error());
  if (auto consuming = (*client)->consume(names.jobs_queue, slots); !consuming)
    return tl::unexpected(consuming.error());
  return client;
}

bool signal_within(BlockedSignals& signals, std::chrono::milliseconds wait) {
  auto until = std::chrono::steady_clock::now() + wait;
  while (std::chrono::steady_clock::now() < until)
    if (signals.next_signal(100ms))
      return true;
  return false;
}

// Stops the node between connections: its jobs were cancelled already.
int stop_node(caf::actor_system& sys, const runner_node_actor& node) {
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
  // Connects (again) with a growing back-off while the broker is unreachable.
  auto backoff = std::chrono::milliseconds(500ms);
  for (;;) {
    auto client = connect_and_consume(*endpoint, names, slots);
    if (client) {
      backoff = 500ms;
      std::printf("node %s takes jobs from queue %s: %u slot(s)\n",
                  prepared->offer.name.c_str(), names.jobs_queue.c_str(), slots);
      std::fflush(stdout);
      AmqpNode session{sys, **client, names, node, outbox, prepared->offer.name};
      if (auto code = session.run(signals, caf::actor_cast<caf::actor>(sink)))
        return finish(*code);
    } else {
      say("solstice-runner: %s\n",
          client.error().message + "; retrying in " + std::to_string(backoff.count()) + " ms");
    }
    if (signal_within(signals, backoff))
      return finish(stop_node(sys, node));
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30s));
  }
}

}  // namespace solstice::cluster_cli
