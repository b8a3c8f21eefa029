#pragma once
// One call registers every message type and the error category of the runner in
// an actor_system_config — what an embedding host calls before it makes its
// actor_system.
#include <cstdint>
#include <string>

#include <caf/error.hpp>
#include <caf/fwd.hpp>
#include <caf/message.hpp>

namespace solstice {

enum class runner_errc : uint8_t {
  invalid_input = 1,  // bad job file, config or argument
  prepare_failed,     // could not make the VM's files
  qemu_failed,        // QEMU could not start or died
  qmp_failed,         // QMP socket, greeting or command failed
  ssh_failed,         // SSH never became ready, or a transfer failed
  console_failed,     // the console log could not be read
  cancelled,          // the operation was cancelled
  kvm_unusable,       // KVM could not run the guest (QEMU died or stopped it while booting)
  not_released,       // a guest-shell request before the console hand-off: refused
  limit_exceeded,     // a download was larger than the bytes left for it (artifacts_max_bytes)
  node_unavailable,   // a runner node cannot take a job now (busy, shutting down), whatever the job
};

// Adds the runner's message types and error category to `cfg`.
void add_runner_types(caf::actor_system_config& cfg);

// A scheduler of `threads` threads that sleep on a condition variable when idle
// (CAF's "sharing" policy). CAF's default (work stealing, at least 4 threads)
// polls: every worker wakes every 50 µs for 25 ms after each message, so a
// steady trickle of messages (a step's output, one chunk every few ms) keeps
// every worker spinning and takes CPU from the guest. The runner's blocking
// actors are detached; the scheduled ones only pass messages on.
void use_sleeping_scheduler(caf::actor_system_config& cfg, size_t threads = 2);

// The plain-words text of an error made by the runner (its context string), or
// CAF's rendering for others.
std::string error_text(const caf::error& err);

}  // namespace solstice

CAF_ERROR_CODE_ENUM(solstice::runner_errc, "solstice")
