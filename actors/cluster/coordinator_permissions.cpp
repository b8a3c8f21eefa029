#include "actors/cluster/coordinator_permissions.hpp"

#include <spdlog/spdlog.h>

#include "actors/runner_types.hpp"

namespace solstice {

std::string role_text(peer_role role) {
  switch (role) {
    case peer_role::node: return "node";
    case peer_role::submitter: return "submitter";
    case peer_role::operator_role: return "operator";
    case peer_role::coordinator: return "coordinator";
  }
  return "?";
}

namespace coordinator_permissions {

std::optional<peer_identity> sender_identity(coordinator_pointer self, const char* what) {
  const auto& identify = self->state.options.identify;
  if (!identify)
    return peer_identity{peer_role::operator_role, ""};
  const auto& sender = self->current_sender();
  if (!sender) {
    spdlog::warn("refused {} from an anonymous sender", what);
    return std::nullopt;
  }
  if (sender->node() == self->node())
    return peer_identity{peer_role::operator_role, "(local)"};
  auto who = identify(sender->node());
  if (!who)
    spdlog::warn("refused {} from an unidentified peer ({})", what, to_string(sender->node()));
  return who;
}

std::string describe(const peer_identity& who) {
  return role_text(who.role) + " " + who.name;
}

caf::error refuse(const peer_identity& who, const char* what, const std::string& why) {
  spdlog::warn("refused {} from {}: {}", what, describe(who), why);
  return caf::make_error(runner_errc::invalid_input, "refused: " + why);
}

bool may_see(const peer_identity& who, const coordinator_job& job) {
  return who.role == peer_role::operator_role ||
         (who.role == peer_role::submitter && who.name == job.owner);
}

bool lives_with_sender(coordinator_pointer self, const caf::actor_addr& handle) {
  const auto& sender = self->current_sender();
  return !self->state.options.identify || (sender && handle && handle.node() == sender->node());
}

bool from_itself(coordinator_pointer self, const char* what) {
  const auto& sender = self->current_sender();
  if (!self->state.options.identify || (sender && sender->node() == self->node()))
    return true;
  auto who = sender ? self->state.options.identify(sender->node()) : std::nullopt;
  spdlog::warn("refused {} from {}: internal to the coordinator", what,
               who ? describe(*who) : std::string{"an unidentified peer"});
  return false;
}

bool from_dispatched_node(event_sink_actor::pointer relay, const peer_identifier& identify,
                          const std::string& node, const v1::JobEvent& event, uint64_t dispatch) {
  if (!identify)
    return true;
  const auto& sender = relay->current_sender();
  auto who = sender ? identify(sender->node()) : std::nullopt;
  if (who && who->role == peer_role::node && who->name == node)
    return true;
  spdlog::warn("refused an event of job {} (dispatch {}) from {}: only node {} reports on it",
               event.job_id(), dispatch, who ? describe(*who) : "an unidentified peer", node);
  return false;
}

}  // namespace coordinator_permissions
}  // namespace solstice
