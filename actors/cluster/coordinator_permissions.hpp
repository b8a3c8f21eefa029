#pragma once
// Who may do what at the coordinator (actors/cluster/coordinator.cpp asks before
// it acts): each message's sender is mapped to the role and name its TLS
// certificate proved (actors/host/cluster/peer_identity.cpp); a refusal is logged
// with the peer's name and changes nothing. Without TLS there are no roles and
// every peer may do everything.
#include <optional>
#include <string>

#include "actors/cluster/coordinator.hpp"

namespace solstice::coordinator_permissions {

using coordinator_pointer = coordinator_actor::stateful_pointer<coordinator_state>;

// Who sent the current message, or nullopt (logged) when it may not be served:
// an anonymous or unidentified sender under TLS. The coordinator's own actors
// count as operators, and so does everyone without TLS (no roles).
std::optional<peer_identity> sender_identity(coordinator_pointer self, const char* what);

// "submitter alice", for log lines.
std::string describe(const peer_identity& who);

// Logs the refusal of `what` from `who` and returns the error its sender gets.
caf::error refuse(const peer_identity& who, const char* what, const std::string& why);

// A submitter sees, follows and cancels its own jobs; an operator every job.
bool may_see(const peer_identity& who, const coordinator_job& job);

// A handle a peer hands over (its sink, its node actor) must be its own: one
// on another peer's process would let it act for that peer.
bool lives_with_sender(coordinator_pointer self, const caf::actor_addr& handle);

// Internal messages (relays, ticks) come from the coordinator's own process only.
bool from_itself(coordinator_pointer self, const char* what);

// Whether the current message of a dispatch's relay comes from `node`, the node
// the job was dispatched to (logged when not): its handle is no secret, actor ids
// are sequential. Always true without TLS.
bool from_dispatched_node(event_sink_actor::pointer relay, const peer_identifier& identify,
                          const std::string& node, const v1::JobEvent& event, uint64_t dispatch);

}  // namespace solstice::coordinator_permissions
