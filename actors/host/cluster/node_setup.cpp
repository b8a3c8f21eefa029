// What every runner node shares, whichever intake feeds it (a CAF coordinator or
// an AMQP queue): its configuration, the clean-up of what a dead node left, what
// it offers, and the runner_node actor that runs its jobs.
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include <caf/spawn_options.hpp>

#include "actors/cluster/runner_node.hpp"
#include "actors/host/cluster/cluster_commands.hpp"
#include "runtime/vm/image_cache.hpp"
#include "actors/host/embedding.hpp"
#include "actors/host/runner_host.hpp"
#include "runtime/vm/job_claim.hpp"

namespace solstice::cluster_cli {

namespace {

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

// What the node offers: its name, slots, memory budget and the labels of its
// images (with their memory).
node_offer offer_for(const NodeOptions& options, const v1::RunnerConfig& config) {
  node_offer offer;
  offer.name = options.name.empty() ? default_node_name() : options.name;
  offer.slots = options.slots ? options.slots : std::max(1u, config.max_concurrent_vms());
  offer.memory_mib = options.memory_mib ? options.memory_mib : default_memory_budget_mib();
  for (const auto& image : config.images())
    offer.labels[image.label()] = image.memory_mib() ? image.memory_mib() : 512;
  return offer;
}

}  // namespace

Result<PreparedNode> prepare_node(const NodeOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, options.accel);
  if (!config)
    return tl::unexpected(config.error());
  if (options.cold)
    config->set_snapshots("off");
  // Whatever a node that died left in this state directory is cleaned first, the
  // way every embedding host does at its start.
  if (auto recovered = recover_abandoned_jobs_at_start(*config); !recovered)
    say("solstice-runner: recovery skipped: %s\n", recovered.error().message);
  else
    for (const auto& job : *recovered)
      say("solstice-runner: %s\n", job.description);
  // Configured images with a url are pulled before the node offers their labels.
  for (const auto& image : std::vector<v1::ImageSpec>(config->images().begin(), config->images().end()))
    if (auto pulled = pull_if_missing(*config, image.label(), ::isatty(STDERR_FILENO) != 0); !pulled)
      return tl::unexpected(pulled.error());
  PreparedNode node{*config, offer_for(options, *config)};
  return node;
}

runner_node_actor spawn_runner_node(caf::actor_system& sys, const PreparedNode& node,
                                    bool replace_records) {
  job_launcher launcher = [config = node.config, replace_records](
                            caf::actor_system& system, const v1::JobSpec& job,
                            event_sink_actor events) -> Result<launched_job> {
    Result<StartedJob> started = fail("");
    if (replace_records && !job.id().empty()) {
      auto claim = JobClaim::take(config, job.id(), true);
      if (!claim)
        return fail(claim.error().message);
      started = start_job(system, job, config, std::move(events), std::move(*claim));
    } else {
      started = start_job(system, job, config, std::move(events));
    }
    if (!started)
      return tl::unexpected(started.error());
    return launched_job{started->supervisor, started->recorder};
  };
  // Detached: the launcher validates each job (the disk image check runs
  // `qemu-img info`) inside the node's handler, which must not hold a thread of
  // the shared scheduler.
  return sys.spawn<caf::detached>(runner_node, node.offer.name, node.offer.slots, launcher);
}

}  // namespace solstice::cluster_cli
