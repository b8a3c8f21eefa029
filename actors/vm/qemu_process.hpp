#pragma once
#include <memory>
#include <optional>
#include <string>

#include "actors/actors.hpp"
#include "runtime/base/child_process.hpp"
#include "runtime/base/fd_waiter.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/vm/qemu_user.hpp"

namespace solstice {

struct qemu_process_state {
  static inline const char* name = "qemu_process";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  qemu_process_state() = default;
  qemu_observer_actor observer;
  v1::VmHandle handle;
  bool prepared = false;
  // The unprivileged user QEMU runs as (nullopt: the runner's own user), and what
  // of the VM's files it is given (filled at prepare).
  std::optional<QemuUser> qemu_user;
  VmFiles vm_files;
  std::optional<ChildProcess> child;
  // Counts this QEMU in the running VMs from its start until its exit.
  std::optional<RunningVmCount> running_count;
  // The last bytes QEMU wrote to stderr, for error reports.
  std::string stderr_tail;
  bool exit_reported = false;
  bool stderr_closed = false;
  // Wakes the actor when QEMU exits (its pidfd) or writes to stderr.
  std::unique_ptr<FdWaiter> waiter;
  ~qemu_process_state();
};

// The actor's own interface: the public one plus its wake-up (QEMU's pidfd or
// stderr became readable), which only the actor itself sends.
using qemu_process_internal = qemu_process_actor::extend<caf::reacts_to<tick_atom>>;

// Owns the QEMU child. Spawn it detached: prepare/launch/cleanup do short
// blocking file and process work on the actor's own thread.
qemu_process_internal::behavior_type
qemu_process(qemu_process_internal::stateful_pointer<qemu_process_state> self,
             qemu_observer_actor observer);

}  // namespace solstice
