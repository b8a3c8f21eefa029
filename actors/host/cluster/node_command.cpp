// `solstice-runner node`: joins a coordinator (and rejoins it when it is lost) and runs
// the jobs it dispatches, each in a fresh VM.
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include <caf/after.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/cluster/runner_node.hpp"
#include "actors/host/embedding.hpp"
#include "actors/runner_types.hpp"

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/host/runner_host.hpp"

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

}  // namespace

int node_command(const NodeOptions& options) {
  auto join = parse_endpoint(options.join, "--join");
  if (!join) {
    say("solstice-runner: %s\n", join.error().message);
    return exit_invalid_input;
  }
  if (auto ok = check_tls_files(options.net); !ok) {
    say("solstice-runner: %s\n", ok.error().message);
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
  node_offer offer;
  offer.name = options.name.empty() ? default_node_name() : options.name;
  offer.slots = options.slots ? options.slots : std::max(1u, config->max_concurrent_vms());
  offer.memory_mib = options.memory_mib ? options.memory_mib : default_memory_budget_mib();
  for (const auto& image : config->images())
    offer.labels[image.label()] = image.memory_mib() ? image.memory_mib() : 512;

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
  caf::scoped_actor self{sys};
  self->monitor(node);
  auto node_down = false;

  // Stops the node: its jobs are cancelled (their VMs powered down); a second
  // signal, or two minutes, and it is killed.
  auto shut_down = [&] {
    say("solstice-runner: %s\n", "node shutting down: cancelling its jobs");
    self->send(node, stop_atom::value);
    auto deadline = std::chrono::steady_clock::now() + 2min;
    while (!node_down && std::chrono::steady_clock::now() < deadline) {
      self->receive([&](caf::down_msg& msg) { node_down |= msg.source == node.address(); },
                    caf::after(200ms) >> [] {});
      if (signals.next_signal(0ms))
        break;
    }
    if (!node_down)
      self->send_exit(node, caf::exit_reason::kill);
    return 0;
  };

  auto backoff = 500ms;
  const auto max_backoff = std::chrono::milliseconds(30s);
  const auto request_timeout = std::chrono::milliseconds(10s);
  for (;;) {
    auto coordinator_handle = connect_to_coordinator(sys, *join, options.net, request_timeout);
    std::string problem;
    if (!coordinator_handle) {
      problem = coordinator_handle.error().message;
    } else {
      self->request(*coordinator_handle, request_timeout, join_atom::value, offer, node)
        .receive([](ok_atom) {},
                 [&](caf::error& err) { problem = "the coordinator refused to let this node join: " + error_text(err); });
    }
    if (problem.empty()) {
      backoff = 500ms;
      std::printf("node %s joined the coordinator at %s: %u slot(s), memory budget %u MiB\n",
                  offer.name.c_str(), join->text().c_str(), offer.slots, offer.memory_mib);
      std::fflush(stdout);
      self->monitor(*coordinator_handle);
      auto lost = false;
      while (!lost) {
        std::string reason;
        self->receive(
          [&](caf::down_msg& msg) {
            if (msg.source == coordinator_handle->address()) {
              lost = true;
              reason = peer_loss_text(msg.reason);
            } else if (msg.source == node.address()) {
              node_down = true;
            }
          },
          caf::after(200ms) >> [] {});
        if (node_down) {
          say("solstice-runner: %s\n", "the node actor ended unexpectedly");
          return exit_infrastructure_error;
        }
        if (signals.next_signal(0ms))
          return shut_down();
        if (lost)
          say("solstice-runner: lost the coordinator (%s); this node's jobs are cancelled, "
              "reconnecting\n",
              reason);
      }
    } else {
      say("solstice-runner: %s\n", problem + "; retrying in " +
                                     std::to_string(backoff.count()) + " ms");
    }
    // Back off before the next attempt, still answering signals.
    auto until = std::chrono::steady_clock::now() + backoff;
    while (std::chrono::steady_clock::now() < until) {
      if (signals.next_signal(100ms))
        return shut_down();
    }
    backoff = std::min(backoff * 2, max_backoff);
  }
}

}  // namespace solstice::cluster_cli
