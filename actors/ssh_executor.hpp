#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>

#include <caf/typed_response_promise.hpp>

#include "actors/actors.hpp"
#include "runtime/byte_credit.hpp"
#include "runtime/serial_worker.hpp"
#include "runtime/ssh_session.hpp"

namespace solstice {

// Unacknowledged step output allowed in flight (memory bound of a flood).
inline constexpr size_t output_credit_bytes = 4 * 1024 * 1024;

struct ssh_executor_state {
  static inline const char* name = "ssh_executor";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  ssh_executor_state() = default;
  vm_observer_actor observer;
  // The session lives on the worker thread only; this slot is how tasks share it.
  std::shared_ptr<std::optional<SshSession>> session =
    std::make_shared<std::optional<SshSession>>();
  // Where the session goes; kept to reconnect (set by `ready`).
  std::shared_ptr<const SshTarget> target;
  uint64_t next_op = 1;
  // Output handed to the observer but not yet acknowledged is bounded by this.
  std::shared_ptr<ByteCredit> output_credit = std::make_shared<ByteCredit>(output_credit_bytes);
  std::map<uint64_t, caf::typed_response_promise<ok_atom>> ok_replies;
  std::map<uint64_t, caf::typed_response_promise<v1::StepResult>> exec_replies;
  // Cancel flags of the operations not finished yet.
  std::map<uint64_t, std::shared_ptr<std::atomic<bool>>> in_flight;
  // Declared last: destroyed first, after the destructor has cancelled all work.
  std::unique_ptr<SerialWorker> worker = std::make_unique<SerialWorker>();
  ~ssh_executor_state();
};

// Owns one SSH session to the guest. Every libssh2 call runs on the executor's
// own worker thread; results come back as `done` messages and are answered here.
ssh_executor_actor::behavior_type
ssh_executor(ssh_executor_actor::stateful_pointer<ssh_executor_state> self,
             vm_observer_actor observer);

}  // namespace solstice
