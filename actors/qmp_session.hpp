#pragma once
#include <memory>
#include <optional>

#include "actors/actors.hpp"
#include "runtime/fd_waiter.hpp"
#include "runtime/qmp.hpp"

namespace solstice {

struct qmp_session_state {
  static inline const char* name = "qmp_session";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  qmp_session_state() = default;
  vm_observer_actor observer;
  std::optional<QmpClient> client;
  // Wakes the actor when the QMP socket has something to read.
  std::unique_ptr<FdWaiter> waiter;
  ~qmp_session_state() { waiter.reset(); }  // before the client closes its socket
};

// Owns the QMP socket. Spawn it detached: commands block its own thread briefly
// (QMP answers in milliseconds); events are polled and forwarded to the observer.
qmp_session_actor::behavior_type
qmp_session(qmp_session_actor::stateful_pointer<qmp_session_state> self,
            vm_observer_actor observer);

}  // namespace solstice
