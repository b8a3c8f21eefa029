#include "actors/console_tailer.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>

namespace solstice {

namespace {

constexpr auto poll_interval = std::chrono::milliseconds(20);

using tailer_pointer = console_tailer_actor::stateful_pointer<console_tailer_state>;

void emit_line(tailer_pointer self, std::string line) {
  if (!line.empty() && line.back() == '\r')
    line.pop_back();
  self->send(self->state.observer, console_atom::value, std::move(line));
}

// Reads everything available now and emits the complete lines.
void read_available(tailer_pointer self) {
  auto& st = self->state;
  if (st.fd < 0) {
    st.fd = ::open(st.path.c_str(), O_RDONLY | O_CLOEXEC);
    if (st.fd < 0)
      return;  // QEMU has not created it yet
  }
  char buf[16384];
  ssize_t n;
  while ((n = ::read(st.fd, buf, sizeof buf)) > 0) {
    st.partial.append(buf, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; (nl = st.partial.find('\n', start)) != std::string::npos; start = nl + 1)
      emit_line(self, st.partial.substr(start, nl - start));
    st.partial.erase(0, start);
    while (st.partial.size() >= console_line_limit) {
      emit_line(self, st.partial.substr(0, console_line_limit));
      st.partial.erase(0, console_line_limit);
    }
  }
}

}  // namespace

console_tailer_state::~console_tailer_state() {
  if (fd >= 0)
    ::close(fd);
}

console_tailer_actor::behavior_type
console_tailer(tailer_pointer self, vm_observer_actor observer, std::string console_log_path) {
  self->state.observer = std::move(observer);
  self->state.path = std::move(console_log_path);
  self->send(self, tick_atom::value);
  return {
    [=](stop_atom) {
      auto& st = self->state;
      if (!st.stopped) {
        st.stopped = true;
        read_available(self);
        if (!st.partial.empty())
          emit_line(self, std::move(st.partial));
        st.partial.clear();
        if (st.fd >= 0)
          ::close(st.fd);
        st.fd = -1;
      }
      return stopped_atom::value;
    },
    [=](tick_atom) {
      if (self->state.stopped)
        return;
      read_available(self);
      self->delayed_send(self, poll_interval, tick_atom::value);
    },
  };
}

}  // namespace solstice
