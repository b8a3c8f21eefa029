#pragma once
// What vm_attempt.cpp and vm_restore.cpp share: the attempt's steps that the
// restore path of a template clone calls (internal to the VM attempt).
#include <string>

#include "actors/vm/vm_attempt.hpp"

namespace solstice::attempt {

using attempt_pointer = vm_attempt_internal::stateful_pointer<vm_attempt_state>;

// A reply or message that makes no sense in the current phase: logged, ignored.
void unexpected(attempt_pointer self, const char* what);
// An SSH or QMP failure during boot (held briefly for QEMU's exit report).
void boot_problem(attempt_pointer self, const std::string& message);
void tell_phase(attempt_pointer self, v1::JobState state, std::string detail);
// Polls SSH until the guest answers; then the attempt is `booted`.
void wait_for_ssh(attempt_pointer self);
// Makes the attempt's SSH executor (once).
void make_ssh_executor(attempt_pointer self);
// How long bringing the guest up may take (boot_timeout_seconds).
std::chrono::milliseconds boot_timeout_of(const vm_attempt_state& st);

// vm_restore.cpp: the SSH port is known and QEMU waits (-incoming defer): connect
// to the identity port (where the template's guest has the agent), load the
// template's state (QMP migrate-incoming), `cont`, give the clone its identity
// over the port, then wait_for_ssh (with the job's own key).
void restore_state(attempt_pointer self);
// The restore's timer: asks QEMU whether the state is loaded yet.
void poll_restore(attempt_pointer self);

}  // namespace solstice::attempt
