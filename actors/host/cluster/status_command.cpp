// `solstice-runner status`: a coordinator's nodes, slots, queued and running jobs.
#include <algorithm>
#include <cstdio>

#include <caf/scoped_actor.hpp>

#include "actors/runner_types.hpp"
#include "runtime/base/clock.hpp"

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/host/runner_host.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

std::string age_text(int64_t since_us) {
  if (since_us <= 0)
    return "-";
  auto seconds = std::max<int64_t>(0, (unix_now_us() - since_us) / 1000000);
  char buf[32];
  if (seconds < 120)
    std::snprintf(buf, sizeof buf, "%llds", static_cast<long long>(seconds));
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(seconds / 60),
                  static_cast<long long>(seconds % 60));
  return buf;
}

std::string format_status(const cluster_status& status, const Endpoint& at) {
  std::string out;
  char buf[512];
  uint32_t slots = 0, used = 0;
  for (const auto& node : status.nodes) {
    slots += node.offer.slots;
    used += node.slots_used;
  }
  std::snprintf(buf, sizeof buf,
                "coordinator %s: %zu node(s), %u of %u slot(s) in use, %zu queued, %zu running\n",
                at.text().c_str(), status.nodes.size(), used, slots, status.queued.size(),
                status.running.size());
  out += buf;
  out += "\nNODES\n";
  std::snprintf(buf, sizeof buf, "  %-24s %-7s %-17s %s\n", "NAME", "SLOTS", "MEMORY (MiB)",
                "LABELS");
  out += buf;
  for (const auto& node : status.nodes) {
    std::string labels;
    for (const auto& [label, memory] : node.offer.labels)
      labels += (labels.empty() ? "" : ", ") + label;
    auto memory = std::to_string(node.memory_used_mib) + "/" +
                  (node.offer.memory_mib ? std::to_string(node.offer.memory_mib) : "unlimited");
    auto slot_text = std::to_string(node.slots_used) + "/" + std::to_string(node.offer.slots);
    std::snprintf(buf, sizeof buf, "  %-24s %-7s %-17s %s\n", node.offer.name.c_str(),
                  slot_text.c_str(), memory.c_str(), labels.empty() ? "-" : labels.c_str());
    out += buf;
  }
  if (status.nodes.empty())
    out += "  (none)\n";
  out += "\nRUNNING\n";
  std::snprintf(buf, sizeof buf, "  %-24s %-20s %-24s %-21s %-8s %s\n", "JOB", "NAME", "NODE",
                "STATE", "ATTEMPT", "FOR");
  out += buf;
  for (const auto& job : status.running) {
    std::snprintf(buf, sizeof buf, "  %-24s %-20s %-24s %-21s %-8u %s\n", job.job_id.c_str(),
                  job.name.c_str(), job.node.c_str(), job.state.c_str(), job.attempt,
                  age_text(job.since_us).c_str());
    out += buf;
  }
  if (status.running.empty())
    out += "  (none)\n";
  out += "\nQUEUED\n";
  std::snprintf(buf, sizeof buf, "  %-24s %-20s %s\n", "JOB", "NAME", "WAITING");
  out += buf;
  for (const auto& job : status.queued) {
    std::snprintf(buf, sizeof buf, "  %-24s %-20s %s\n", job.job_id.c_str(), job.name.c_str(),
                  age_text(job.since_us).c_str());
    out += buf;
  }
  if (status.queued.empty())
    out += "  (none)\n";
  return out;
}

}  // namespace

// `status --amqp`: what the broker knows (a passive declare of each queue).
// Jobs being run are the queue's unacknowledged messages, which AMQP itself does
// not report; the nodes print the jobs they take.
int amqp_status(const StatusOptions& options) {
  auto endpoint = amqp_endpoint(options.amqp);
  if (!endpoint) {
    say("solstice-runner: %s\n", endpoint.error().message);
    return exit_invalid_input;
  }
  auto client = amqp::Client::connect(*endpoint, 15s);
  if (!client) {
    say("solstice-runner: %s\n", client.error().message);
    return exit_infrastructure_error;
  }
  const auto& names = options.amqp.names;
  auto jobs = (*client)->queue_counts(names.jobs_queue);
  if (!jobs) {
    say("solstice-runner: %s\n", jobs.error().message);
    return exit_infrastructure_error;
  }
  std::printf("queue %s: %u job(s) waiting, %u node(s) consuming\n", names.jobs_queue.c_str(),
              jobs->first, jobs->second);
  if (auto dead = (*client)->queue_counts(names.dead_letter_queue))
    std::printf("dead-letter queue %s: %u message(s)\n", names.dead_letter_queue.c_str(),
                dead->first);
  return 0;
}

int status_command(const StatusOptions& options) {
  if (!options.amqp.url.empty())
    return amqp_status(options);
  if (options.to.empty()) {
    say("solstice-runner: %s\n", "status: give --to HOST:PORT (a coordinator) or --amqp URL");
    return exit_invalid_input;
  }
  auto to = checked_endpoint(options.to, "--to", options.net);
  if (!to) {
    say("solstice-runner: %s\n", to.error().message);
    return exit_invalid_input;
  }
  ClusterConfig cfg{options.net};
  caf::actor_system sys{cfg};
  auto coordinator_handle = connect_to_coordinator(sys, *to, options.net, 15s);
  if (!coordinator_handle) {
    say("solstice-runner: %s\n", coordinator_handle.error().message);
    return exit_infrastructure_error;
  }
  caf::scoped_actor self{sys};
  int code = 0;
  self->request(*coordinator_handle, std::chrono::milliseconds(15s), status_atom::value)
    .receive(
      [&](const cluster_status& status) {
        auto text = format_status(status, *to);
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      },
      [&](caf::error& err) {
        say("solstice-runner: the coordinator did not answer: %s\n", error_text(err));
        code = exit_infrastructure_error;
      });
  return code;
}

}  // namespace solstice::cluster_cli
