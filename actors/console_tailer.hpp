#pragma once
#include <string>

#include "actors/actors.hpp"

namespace solstice {

struct console_tailer_state {
  static inline const char* name = "console_tailer";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  console_tailer_state() = default;
  vm_observer_actor observer;
  std::string path;
  int fd = -1;
  // Bytes of a line whose end has not arrived yet.
  std::string partial;
  bool stopped = false;
  ~console_tailer_state();
};

// Longest console line kept whole; a longer run without a newline is emitted in
// pieces of this size so memory stays bounded.
inline constexpr size_t console_line_limit = 64 * 1024;

// Follows the serial console log QEMU writes and emits its lines to the observer
// until `stop`. Spawn it detached (it reads a file on every tick).
console_tailer_actor::behavior_type
console_tailer(console_tailer_actor::stateful_pointer<console_tailer_state> self,
               vm_observer_actor observer, std::string console_log_path);

}  // namespace solstice
