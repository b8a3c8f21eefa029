// `solstice-runner node`: joins a coordinator (and rejoins it when it is lost) and runs
// the jobs it dispatches, each in a fresh VM.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <optional>

#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/cluster/runner_node.hpp"
#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/host/embedding.hpp"
#include "actors/host/runner_host.hpp"
#include "actors/runner_types.hpp"
#include "runtime/vm/image_cache.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

Result<v1::RunnerConfig> load_node_config(const NodeOptions& options) {
  return load_effective_config(options.config_file, options.state_dir, options.accel);
}

std::string default_node_name() {
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) != 0)
    std::snprintf(host, sizeof host, "node");
  return std::string{host} + "-" + std::to_string(::getpid());
}

uint32_t default_memory_budget_mib() {
  auto pages = ::sysconf(_SC_PHYS_PAGES);
  auto page_size = ::sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page_size <= 0)
    return 0;
  auto total_mib = static_cast<uint64_t>(pages) * static_cast<uint64_t>(page_size) >> 20;
  // Leave a quarter of the host's memory to the host.
  return static_cast<uint32_t>(total_mib * 3 / 4);
}

// What the node offers the coordinator: its name, slots, memory budget and the
// labels of its images (with their memory).
node_offer offer_for(const NodeOptions& options, const v1::RunnerConfig& config) {
  node_offer offer;
  offer.name = options.name.empty() ? default_node_name() : options.name;
  offer.slots = options.slots ? options.slots : std::max(1u, config.max_concurrent_vms());
  offer.memory_mib = options.memory_mib ? options.memory_mib : default_memory_budget_mib();
  for (const auto& image : config.images())
    offer.labels[image.label()] = image.memory_mib() ? image.memory_mib() : 512;
  return offer;
}

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
  auto join = checked_endpoint(options.join, "--join", options.net);
  if (!join) {
    say("solstice-runner: %s\n", join.error().message);
    return exit_invalid_input;
  }
  auto config = load_node_config(options);
  if (!config) {
    say("solstice-runner: %s\n", config.error().message);
    return exit_invalid_input;
  }
  // Whatever a node that died left in this state directory is cleaned first, the
  // way every embedding host does at its start.
  if (auto recovered = recover_abandoned_jobs_at_start(*config); !recovered)
    say("solstice-runner: recovery skipped: %s\n", recovered.error().message);
  else
    for (const auto& job : *recovered)
      say("solstice-runner: %s\n", job.description);
  // Configured images with a url are pulled before the node offers their labels.
  std::vector<std::string> labels;
  for (const auto& image : config->images())
    labels.push_back(image.label());
  for (const auto& label : labels)
    if (auto pulled = pull_if_missing(*config, label, ::isatty(STDERR_FILENO) != 0); !pulled) {
      say("solstice-runner: %s\n", pulled.error().message);
      return exit_infrastructure_error;
    }
  const node_offer offer = offer_for(options, *config);

  BlockedSignals signals;
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  job_launcher launcher = [config = *config](caf::actor_system& system, const v1::JobSpec& job,
                                             event_sink_actor events) -> Result<launched_job> {
    auto started = start_job(system, job, config, std::move(events));
    if (!started)
      return tl::unexpected(started.error());
    return launched_job{started->supervisor, started->recorder};
  };
  // Detached: the launcher validates each job (the disk image check runs
  // `qemu-img info`) inside the node's handler, which must not hold a thread of
  // the shared scheduler.
  auto node = sys.spawn<caf::detached>(runner_node, offer.name, offer.slots, launcher);
  NodeSession session{sys, signals, node, offer, *join, options.net};
  return session.run();
}

}  // namespace solstice::cluster_cli
