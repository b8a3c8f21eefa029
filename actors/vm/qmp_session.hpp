#pragma once
#include <memory>
#include <optional>

#include "actors/actors.hpp"
#include "runtime/base/fd_waiter.hpp"
#include "runtime/vm/qmp.hpp"

namespace solstice {

struct qmp_session_state {
  static inline const char* name = "qmp_session";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  qmp_session_state() = default;
  qmp_observer_actor observer;
  std::optional<QmpClient> client;
  bool closed_reported = false;
  // Wakes the actor when the QMP socket has something to read.
  std::unique_ptr<FdWaiter> waiter;
  ~qmp_session_state() { waiter.reset(); }  // before the client closes its socket
};

// Owns the QMP socket. Spawn it detached: commands block its own thread briefly
// (QMP answers in milliseconds); events are polled and forwarded to the observer.
// The actor's own interface: the public one plus its wake-up (the socket became
// readable), which only the actor itself sends.
using qmp_session_internal = qmp_session_actor::extend<caf::reacts_to<tick_atom>>;

qmp_session_internal::behavior_type
qmp_session(qmp_session_internal::stateful_pointer<qmp_session_state> self,
            qmp_observer_actor observer);

}  // namespace solstice
