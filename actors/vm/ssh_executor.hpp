#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>

#include <caf/typed_response_promise.hpp>

#include "actors/actors.hpp"
#include "runtime/base/byte_credit.hpp"
#include "runtime/base/serial_worker.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "runtime/vm/identity_channel.hpp"

namespace solstice {

// Unacknowledged step output allowed in flight (memory bound of a flood).
inline constexpr size_t output_credit_bytes = 4 * 1024 * 1024;

struct ssh_executor_state {
  static inline const char* name = "ssh_executor";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  ssh_executor_state() = default;
  output_observer_actor observer;
  // Gated until the VM attempt's console hand-off releases it: before that,
  // every guest-shell request is refused (and never reaches the guest).
  enum class gate { closed, released } shell_gate = gate::closed;
  // The session lives on the worker thread only; this slot is how tasks share it.
  std::shared_ptr<std::optional<SshSession>> session =
    std::make_shared<std::optional<SshSession>>();
  // A restored clone's identity port, from `connect` until `identity` (worker only).
  std::shared_ptr<IdentityChannel> channel = std::make_shared<IdentityChannel>();
  // Where the session goes; kept to reconnect (set by `ready`).
  std::shared_ptr<const SshTarget> target;
  uint64_t next_op = 1;
  // Output handed to the observer but not yet acknowledged is bounded by this.
  std::shared_ptr<ByteCredit> output_credit = std::make_shared<ByteCredit>(output_credit_bytes);
  std::map<uint64_t, caf::typed_response_promise<ok_atom>> ok_replies;
  std::map<uint64_t, caf::typed_response_promise<v1::StepResult>> exec_replies;
  // Operations that answer a text, which their work leaves in the shared string.
  std::map<uint64_t, std::pair<caf::typed_response_promise<std::string>, std::shared_ptr<std::string>>>
    text_replies;
  // Cancel flags of the operations not finished yet.
  std::map<uint64_t, std::shared_ptr<std::atomic<bool>>> in_flight;
  // Declared last: destroyed first, after the destructor has cancelled all work.
  std::unique_ptr<SerialWorker> worker = std::make_unique<SerialWorker>();
  ~ssh_executor_state();
};

// The actor's own interface: the public one plus what its worker thread sends
// it (an operation finished; a chunk of output read), which nobody else may send.
using ssh_executor_internal = ssh_executor_actor::extend<
  // The worker finished operation `id` (error text empty on success).
  caf::reacts_to<done_atom, uint64_t, std::string, v1::StepResult>,
  // The worker read a chunk of output.
  caf::reacts_to<output_atom, v1::OutputChunk>>;

// Owns one SSH session to the guest. Every libssh2 call runs on the executor's
// own worker thread; results come back as `done` messages and are answered here.
ssh_executor_internal::behavior_type
ssh_executor(ssh_executor_internal::stateful_pointer<ssh_executor_state> self,
             output_observer_actor observer);

}  // namespace solstice
