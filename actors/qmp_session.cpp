#include "actors/qmp_session.hpp"

#include <chrono>

#include "actors/runner_types.hpp"

namespace solstice {

namespace {

constexpr auto poll_interval = std::chrono::milliseconds(10);

void forward_events(qmp_session_actor::stateful_pointer<qmp_session_state> self) {
  auto& st = self->state;
  while (auto event = st.client->next_event(std::chrono::milliseconds(0))) {
    v1::QmpEvent out;
    out.set_name(event->event);
    out.set_data_json(event->data.is_null() ? "{}" : event->data.dump());
    self->send(st.observer, qmp_event_atom::value, std::move(out));
  }
}

}  // namespace

qmp_session_actor::behavior_type
qmp_session(qmp_session_actor::stateful_pointer<qmp_session_state> self,
            vm_observer_actor observer) {
  self->state.observer = std::move(observer);
  return {
    [=](connect_atom, const std::string& socket, uint32_t timeout_ms) -> caf::result<ok_atom> {
      auto client = QmpClient::connect(socket, std::chrono::milliseconds(timeout_ms));
      if (!client)
        return caf::make_error(runner_errc::qmp_failed, client.error().message);
      self->state.client = std::move(*client);
      self->delayed_send(self, poll_interval, tick_atom::value);
      return ok_atom::value;
    },
    [=](command_atom, const std::string& command,
        const std::string& arguments) -> caf::result<std::string> {
      auto& st = self->state;
      if (!st.client)
        return caf::make_error(runner_errc::qmp_failed, "QMP is not connected");
      auto args = nlohmann::json::parse(arguments, nullptr, false);
      if (args.is_discarded())
        return caf::make_error(runner_errc::qmp_failed,
                               "QMP arguments for " + command + " are not JSON: " + arguments);
      auto reply = st.client->execute(command, args, std::chrono::seconds(10));
      forward_events(self);
      if (!reply)
        return caf::make_error(runner_errc::qmp_failed, reply.error().message);
      return reply->dump();
    },
    [=](tick_atom) {
      if (!self->state.client)
        return;
      forward_events(self);
      self->delayed_send(self, poll_interval, tick_atom::value);
    },
  };
}

}  // namespace solstice
