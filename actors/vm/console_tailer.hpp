#pragma once
#include <sys/types.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "actors/actors.hpp"
#include "runtime/base/fd_waiter.hpp"
#include "runtime/job/redacted_file.hpp"

namespace solstice {

// The serial console of one VM. QEMU writes its raw capture into the VM's work
// directory (removed with the VM); the job's console.log, the file the user reads,
// is written by the tailer from that capture with the job's secrets replaced.
// Why the tailer: it is the one reader of the capture, so the record is every byte
// in QEMU's order (kernel messages, /dev/console writes of steps) with no second
// path through the events. Lines are emitted only until `stop` (the hand-off, so
// no console line follows step output); the record goes on: the tailer keeps the
// capture open and copies what came after the hand-off every second, and the rest
// when it ends with its VM attempt, after QEMU has exited. Not following it live
// during the steps saves a wake-up per console write; the live view is the events
// and the terminal. What the record holds is punched out of the capture (QEMU
// appends on), so the capture on disk stays small whatever a step writes to the
// console; the record itself is capped by console_max_bytes.
struct console_capture {
  std::string raw_path;     // what QEMU writes
  std::string record_path;  // the job's console.log; empty: no record
  std::vector<std::string> secrets;
  uint64_t record_max_bytes = 0;  // console_max_bytes; 0: no bound
};

struct console_tailer_state {
  static inline const char* name = "console_tailer";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  console_tailer_state() = default;
  console_observer_actor observer;
  std::string path;
  int fd = -1;
  // Once the file exists: inotify reports its growth, the waiter wakes the actor.
  bool use_inotify = true;
  int inotify_fd = -1;
  std::unique_ptr<FdWaiter> waiter;
  // Bytes of a line whose end has not arrived yet.
  std::string partial;
  bool stopped = false;
  // The job's console.log (see console_capture).
  std::optional<RedactedFile> record;
  // Bytes at the capture's start already copied to the record and punched out.
  off_t released = 0;
  bool punch_unsupported = false;
  ~console_tailer_state();
};

// Longest console line kept whole; a longer run without a newline is emitted in
// pieces of this size so memory stays bounded.
inline constexpr size_t console_line_limit = 64 * 1024;

// How the tailer learns that the log grew: inotify wakes it at once (a thread
// of its own blocks on it); a timer reads every 20 ms instead (what tests on
// CAF's deterministic scheduler use: no foreign thread sends to the actor).
enum class console_wakeup { inotify, timer };

// Follows the serial console log QEMU writes and emits its lines to the observer
// until `stop`, and keeps the redacted record (see console_capture) until it ends.
// Spawn it detached (it reads a file whenever it grows).
// The actor's own interface: the public one plus its wake-up (the log grew, or
// the poll timer), which only the actor itself sends.
using console_tailer_internal = console_tailer_actor::extend<caf::reacts_to<tick_atom>>;

console_tailer_internal::behavior_type
console_tailer(console_tailer_internal::stateful_pointer<console_tailer_state> self,
               console_observer_actor observer, console_capture capture, console_wakeup wakeup);

}  // namespace solstice
