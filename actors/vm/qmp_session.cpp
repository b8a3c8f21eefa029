#include "actors/vm/qmp_session.hpp"

#include <chrono>
#include <vector>

#include <caf/send.hpp>

#include "actors/runner_types.hpp"
#include "runtime/base/child_process.hpp"
#include "runtime/base/proc_stat.hpp"

namespace solstice {

namespace {

// Events are seen when the socket becomes readable; this is a safety net.
constexpr auto fallback_interval = std::chrono::milliseconds(250);

void forward_events(qmp_session_internal::stateful_pointer<qmp_session_state> self) {
  auto& st = self->state;
  while (auto event = st.client->next_event(std::chrono::milliseconds(0))) {
    v1::QmpEvent out;
    out.set_name(event->event);
    out.set_data_json(event->data.is_null() ? "{}" : event->data.dump());
    self->send(st.observer, qmp_event_atom::value, std::move(out));
  }
}

// Tells the observer, once, that QEMU closed the connection.
void report_if_closed(qmp_session_internal::stateful_pointer<qmp_session_state> self) {
  auto& st = self->state;
  if (!st.client || !st.client->peer_closed() || st.closed_reported)
    return;
  st.closed_reported = true;
  self->send(st.observer, qmp_closed_atom::value,
             std::string{"QEMU closed its QMP connection while the VM was running"});
}

}  // namespace

qmp_session_internal::behavior_type
qmp_session(qmp_session_internal::stateful_pointer<qmp_session_state> self,
            qmp_observer_actor observer) {
  self->state.observer = std::move(observer);
  return {
    [=](connect_atom, const std::string& socket, uint32_t timeout_ms,
        int32_t qemu_pid) -> caf::result<ok_atom> {
      // This detached actor cannot see its mailbox while it waits: the wait ends
      // as soon as QEMU is gone, so a dead VM's session never lingers.
      auto qemu_gone = [qemu_pid] { return qemu_pid > 0 && !process_running(qemu_pid); };
      auto client = QmpClient::connect(socket, std::chrono::milliseconds(timeout_ms), qemu_gone);
      if (!client)
        return caf::make_error(runner_errc::qmp_failed, client.error().message);
      auto& st = self->state;
      st.waiter.reset();
      st.client = std::move(*client);
      st.waiter = std::make_unique<FdWaiter>(
        std::vector<int>{st.client->fd()},
        [addr = self->address()] {
          if (auto me = caf::actor_cast<caf::actor>(addr))
            caf::anon_send(me, tick_atom::value);
        },
        fallback_interval);
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
      report_if_closed(self);
      if (!reply)
        return caf::make_error(runner_errc::qmp_failed, reply.error().message);
      return reply->dump();
    },
    [=](tick_atom) {
      auto& st = self->state;
      if (!st.client)
        return;
      forward_events(self);
      // A closed socket stays readable: QEMU is gone, nothing more will come.
      if (!st.client->peer_closed())
        st.waiter->rearm();
      report_if_closed(self);
    },
  };
}

}  // namespace solstice
