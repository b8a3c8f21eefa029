// `solstice-runner node`: joins a coordinator (and rejoins it when it is lost) and runs
// the jobs it dispatches, each in a fresh VM.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>

#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/cluster/runner_node.hpp"
#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/host/embedding.hpp"
#include "actors/host/metrics_server.hpp"
#include "actors/host/runner_host.hpp"
#include "actors/runner_types.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/vm/image_cache.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

// A node at work: joins the coordinator, serves it until it is lost, then joins
// again with a growing back-off. A termination signal shuts the node down.
class NodeSession {
 public:
  NodeSession(caf::actor_system& sys, BlockedSignals& signals, runner_node_actor node,
              const node_offer& offer, const Endpoint& join, const NetworkOptions& net)
      : sys_(sys), signals_(signals), node_(std::move(node)), offer_(offer), join_(join),
        net_(net), self_(sys) {
    self_->monitor(node_);
  }

  int run() {
    auto backoff = 500ms;
    const auto max_backoff = std::chrono::milliseconds(30s);
    for (;;) {
      auto coordinator_handle = connect_to_coordinator(sys_, join_, net_, request_timeout);
      std::string problem =
        coordinator_handle ? join(*coordinator_handle) : coordinator_handle.error().message;
      if (problem.empty()) {
        backoff = 500ms;
        if (auto code = serve(*coordinator_handle))
          return *code;
      } else {
        say("solstice-runner: %s\n", problem + "; retrying in " +
                                       std::to_string(backoff.count()) + " ms");
      }
      // Back off before the next attempt, still answering signals.
      auto until = std::chrono::steady_clock::now() + backoff;
      while (std::chrono::steady_clock::now() < until) {
        if (signals_.next_signal(100ms))
          return shut_down();
      }
      backoff = std::min(backoff * 2, max_backoff);
    }
  }

 private:
  static constexpr auto request_timeout = std::chrono::milliseconds(10s);

  // Asks the coordinator to take this node; "" when it did, else why not.
  std::string join(const coordinator_actor& coordinator) {
    std::string problem;
    self_->request(coordinator, request_timeout, join_atom::value, offer_, node_)
      .receive([](ok_atom) {},
               [&](caf::error& err) {
                 problem = "the coordinator refused to let this node join: " + error_text(err);
               });
    return problem;
  }

  // Serves a coordinator that took this node until it is lost (nullopt: join
  // again) or the process is to end (its exit code).
  std::optional<int> serve(const coordinator_actor& coordinator) {
    std::printf("node %s joined the coordinator at %s: %u slot(s), memory budget %u MiB\n",
                offer_.name.c_str(), join_.text().c_str(), offer_.slots, offer_.memory_mib);
    std::fflush(stdout);
    self_->monitor(coordinator);
    auto lost = false;
    while (!lost) {
      std::string reason;
      self_->receive(
        [&](caf::down_msg& msg) {
          if (msg.source == coordinator.address()) {
            lost = true;
            reason = peer_loss_text(msg.reason);
          } else if (msg.source == node_.address()) {
            node_down_ = true;
          }
        },
        caf::after(200ms) >> [] {});
      if (node_down_) {
        say("solstice-runner: %s\n", "the node actor ended unexpectedly");
        return exit_infrastructure_error;
      }
      if (signals_.next_signal(0ms))
        return shut_down();
      if (lost)
        say("solstice-runner: lost the coordinator (%s); this node's jobs are cancelled, "
            "reconnecting\n",
            reason);
    }
    return std::nullopt;
  }

  // Stops the node: its jobs are cancelled (their VMs powered down); a second
  // signal, or two minutes, and it is killed.
  int shut_down() {
    say("solstice-runner: %s\n", "node shutting down: cancelling its jobs");
    self_->send(node_, stop_atom::value);
    auto deadline = std::chrono::steady_clock::now() + 2min;
    while (!node_down_ && std::chrono::steady_clock::now() < deadline) {
      self_->receive([&](caf::down_msg& msg) { node_down_ |= msg.source == node_.address(); },
                     caf::after(200ms) >> [] {});
      if (signals_.next_signal(0ms))
        break;
    }
    if (!node_down_)
      self_->send_exit(node_, caf::exit_reason::kill);
    return 0;
  }

  caf::actor_system& sys_;
  BlockedSignals& signals_;
  runner_node_actor node_;
  const node_offer& offer_;
  const Endpoint& join_;
  const NetworkOptions& net_;
  caf::scoped_actor self_;
  bool node_down_ = false;
};

}  // namespace

int node_command(const NodeOptions& options) {
  if (!options.amqp.url.empty())
    return amqp_node_command(options);
  if (options.join.empty()) {
    say("solstice-runner: %s\n", "node: give --join HOST:PORT (a coordinator) or --amqp URL");
    return exit_invalid_input;
  }
  auto join = checked_endpoint(options.join, "--join", options.net);
  if (!join) {
    say("solstice-runner: %s\n", join.error().message);
    return exit_invalid_input;
  }
  auto prepared = prepare_node(options);
  if (!prepared) {
    say("solstice-runner: %s\n", prepared.error().message);
    return exit_invalid_input;
  }
  node_offer& offer = prepared->offer;
  // Under TLS a node's name is its certificate's (the coordinator refuses another).
  if (options.net.tls()) {
    auto identity = certificate_file_identity(options.net.cert);
    if (!identity) {
      say("solstice-runner: --cert: %s\n", identity.error().message);
      return exit_invalid_input;
    }
    if (identity->role != peer_role::node) {
      say("solstice-runner: %s\n", "--cert " + options.net.cert + " is a " +
                                      role_text(identity->role) +
                                      " certificate; a node needs one with the node role");
      return exit_invalid_input;
    }
    if (!options.name.empty() && options.name != identity->name) {
      say("solstice-runner: %s\n", "--name " + options.name + " differs from the name of --cert " +
                                      options.net.cert + " ('" + identity->name +
                                      "'): the coordinator knows a node by its certificate");
      return exit_invalid_input;
    }
    offer.name = identity->name;
  }

  BlockedSignals signals;
  metrics().set_slots(offer.slots);
  auto metrics_server = MetricsServer::start_if_asked(options.metrics_listen);
  if (!metrics_server) {
    say("solstice-runner: %s\n", metrics_server.error().message);
    return exit_invalid_input;
  }
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  auto node = spawn_runner_node(sys, *prepared, false);
  NodeSession session{sys, signals, node, offer, *join, options.net};
  return session.run();
}

}  // namespace solstice::cluster_cli
