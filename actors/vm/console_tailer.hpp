#pragma once
#include <memory>
#include <string>

#include "actors/actors.hpp"
#include "runtime/base/fd_waiter.hpp"

namespace solstice {

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
// until `stop`. Spawn it detached (it reads a file whenever it grows).
// The actor's own interface: the public one plus its wake-up (the log grew, or
// the poll timer), which only the actor itself sends.
using console_tailer_internal = console_tailer_actor::extend<caf::reacts_to<tick_atom>>;

console_tailer_internal::behavior_type
console_tailer(console_tailer_internal::stateful_pointer<console_tailer_state> self,
               console_observer_actor observer, std::string console_log_path,
               console_wakeup wakeup);

}  // namespace solstice
