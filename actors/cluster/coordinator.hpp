#pragma once
// The cluster coordinator: takes jobs from submitters, keeps them in a FIFO
// queue, dispatches each to a runner node with a free slot and enough memory
// budget, and relays the job's events back to its submitter, each exactly once
// and renumbered in one sequence even when the job had to be dispatched again.
// A node that is lost (its connection closed or timed out) takes its jobs with
// it: each ends `infrastructure_error`, or is dispatched once more when the job
// allows retries.
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <caf/node_id.hpp>
#include <caf/response_promise.hpp>

#include "actors/actors.hpp"

namespace solstice {

// What a cluster peer may do, from its certificate (actors/host/cluster/
// peer_identity.cpp says which field): a node joins and reports on the jobs
// dispatched to it; a submitter submits and sees, follows and cancels its own
// jobs; an operator sees, follows and cancels every job (and may submit).
// A coordinator's own certificate has the coordinator role: its clients check it.
enum class peer_role : uint8_t { node, submitter, operator_role, coordinator };

struct peer_identity {
  peer_role role = peer_role::submitter;
  std::string name;  // the certificate's name (its CN)
};

std::string role_text(peer_role role);

// Who the peer process with this node id is, as its TLS connection proved;
// nullopt when no live, identified connection speaks for it.
using peer_identifier = std::function<std::optional<peer_identity>(const caf::node_id&)>;

// How long a hop of the cluster waits for its sink to acknowledge one output
// event before it asks again with a repeat (below): a sink across the network
// that is slow but alive keeps holding the job's output, for as long as it stays
// connected; one that is gone (its DOWN) releases it. Output is never dropped nor
// shown twice for a timeout. A local sink answers or dies and has no window.
inline constexpr std::chrono::milliseconds output_ack_window{std::chrono::seconds(20)};

// An event with no payload, the same job and sequence as `event`: a repeat. A
// sink shows nothing for it and answers it once it has handled everything
// before it (the original came first on the same connection), so asking again
// costs no bandwidth and shows no byte twice.
v1::JobEvent repeat_of(const v1::JobEvent& event);
bool is_repeat(const v1::JobEvent& event);

struct coordinator_options {
  // Empty: no roles (insecure mode, no TLS): every peer may do everything.
  peer_identifier identify;
  // How long a node has to accept a dispatched job.
  std::chrono::milliseconds dispatch_timeout{std::chrono::seconds(30)};
  // How long a job may wait in the queue for a node that can take it.
  std::chrono::milliseconds queue_timeout{std::chrono::hours(1)};
  // How long a submitter or follower has to acknowledge one output event before
  // it is asked again (while it stays connected).
  std::chrono::milliseconds ack_window{output_ack_window};
  // How often queue deadlines are checked.
  std::chrono::milliseconds tick_interval{std::chrono::seconds(1)};
};

struct coordinator_node {
  runner_node_actor handle;
  node_offer offer;
  uint32_t slots_used = 0;
  uint32_t memory_used_mib = 0;
  std::set<std::string> jobs;
  uint64_t last_dispatch = 0;  // serial of its latest dispatch (spreads ties)
};

struct coordinator_job {
  v1::JobSpec spec;
  std::string owner;           // the submitter's certificate name ("" without TLS)
  event_sink_actor submitter;  // invalid once the submitter is gone
  std::vector<event_sink_actor> followers;  // sinks that asked to `follow` it
  uint32_t attempts = 0;       // dispatches so far
  std::optional<caf::actor_addr> node;  // while dispatched
  uint64_t dispatch = 0;       // id of the current dispatch (0: none)
  event_sink_actor relay;      // the current dispatch's relay
  uint32_t memory_mib = 0;     // reserved on its node
  // Events to the submitter are numbered here, across dispatches.
  uint64_t next_sequence = 0;
  // Highest node-side sequence relayed for the current dispatch.
  std::optional<uint64_t> last_node_sequence;
  // Output of the current dispatch (by node-side sequence) that its node waits
  // for, not yet acknowledged by every live sink; and the node's repeats of it,
  // answered together with it.
  std::set<uint64_t> unacknowledged;
  std::multimap<uint64_t, caf::response_promise> repeats;
  std::string state = "QUEUED";
  int64_t since_us = 0;
  std::chrono::steady_clock::time_point queued_at;
  bool cancel_requested = false;
};

struct coordinator_state {
  static inline const char* name = "coordinator";
  coordinator_state() = default;
  coordinator_options options;
  std::map<caf::actor_addr, coordinator_node> nodes;
  std::map<std::string, coordinator_job> jobs;  // queued and running, by id
  std::deque<std::string> queue;                // job ids waiting, in order
  std::map<uint64_t, std::string> dispatches;   // dispatch id -> job id
  // Submitters' and followers' sinks still connected (monitored; gone at DOWN).
  std::set<caf::actor_addr> live_sinks;
  uint64_t next_dispatch = 1;
  // Every relay alive, killed when the coordinator ends.
  std::shared_ptr<std::set<caf::actor>> relays = std::make_shared<std::set<caf::actor>>();
};

coordinator_actor::behavior_type
coordinator(coordinator_actor::stateful_pointer<coordinator_state> self,
            coordinator_options options);

// A result event made outside a job supervisor (node lost, job refused,
// cancelled while queued): the status, the exit code `run` would give for it,
// the error and a one-line summary.
v1::JobEvent cluster_result_event(const std::string& job_id, uint64_t sequence,
                                  v1::JobStatus status, const std::string& error);

// Why a remote peer counts as gone, in plain words ("its connection closed or
// timed out" for a lost link).
std::string peer_loss_text(const caf::error& reason);

}  // namespace solstice
