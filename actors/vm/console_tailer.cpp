#include "actors/vm/console_tailer.hpp"

#include <fcntl.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include <caf/send.hpp>
#include <spdlog/spdlog.h>

namespace solstice {

namespace {

// Until QEMU has created the log, it is looked for this often.
constexpr auto poll_interval = std::chrono::milliseconds(20);
// Afterwards inotify says when it grows; this is a safety net.
constexpr auto fallback_interval = std::chrono::milliseconds(250);
// After the hand-off the capture is drained into the record this often (no
// wake-up per console write while steps run).
constexpr auto drain_interval = std::chrono::seconds(1);

using tailer_pointer = console_tailer_internal::stateful_pointer<console_tailer_state>;

void emit_line(tailer_pointer self, std::string line) {
  if (!line.empty() && line.back() == '\r')
    line.pop_back();
  self->send(self->state.observer, console_atom::value, std::move(line));
}

// Copies raw console bytes into the redacted record; a write error is logged
// once and ends the record (the job goes on).
void copy_to_record(console_tailer_state& st, std::string_view bytes) {
  if (!st.record)
    return;
  if (auto ok = st.record->append(bytes); !ok) {
    spdlog::warn("console record: {}", ok.error().message);
    st.record.reset();
  }
}

// Opens the capture: read-write when it may, to punch out what was read.
bool open_capture(console_tailer_state& st) {
  if (st.fd >= 0)
    return true;
  st.fd = ::open(st.path.c_str(), O_RDWR | O_CLOEXEC);
  if (st.fd < 0)
    st.fd = ::open(st.path.c_str(), O_RDONLY | O_CLOEXEC);
  return st.fd >= 0;
}

// QEMU's capture is bounded on disk: once the record holds its bytes, they are
// punched out of it (a hole: QEMU appends on, the file's blocks are freed). What
// is left is at most what came since the last read. A file system that cannot
// punch holes keeps the capture whole (it goes with the VM's work dir); that is
// said once.
void release_read_bytes(console_tailer_state& st) {
  if (!st.record || st.fd < 0 || st.punch_unsupported)
    return;
  off_t read_up_to = ::lseek(st.fd, 0, SEEK_CUR);
  if (read_up_to <= st.released)
    return;
  if (::fallocate(st.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, st.released,
                  read_up_to - st.released) == 0) {
    st.released = read_up_to;
    return;
  }
  st.punch_unsupported = true;
  spdlog::warn("console capture {}: cannot release what was read ({}); it grows until the VM "
               "ends",
               st.path, std::strerror(errno));
}

// Copies what the capture holds now into the record (after the hand-off).
void drain_into_record(console_tailer_state& st) {
  if (!st.record || st.fd < 0)
    return;
  char buf[16384];
  ssize_t n;
  while (st.record && (n = ::read(st.fd, buf, sizeof buf)) > 0)
    copy_to_record(st, std::string_view(buf, static_cast<size_t>(n)));
  release_read_bytes(st);
}

// Reads everything available now and emits the complete lines.
void read_available(tailer_pointer self) {
  auto& st = self->state;
  if (!open_capture(st))
    return;  // QEMU has not created it yet
  char buf[16384];
  ssize_t n;
  while ((n = ::read(st.fd, buf, sizeof buf)) > 0) {
    copy_to_record(st, std::string_view(buf, static_cast<size_t>(n)));
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
  release_read_bytes(st);
}

// Watches the opened log for growth. Without inotify the actor keeps polling.
void watch_file(tailer_pointer self) {
  auto& st = self->state;
  st.inotify_fd = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (st.inotify_fd < 0)
    return;
  if (::inotify_add_watch(st.inotify_fd, st.path.c_str(), IN_MODIFY | IN_CLOSE_WRITE) < 0) {
    ::close(st.inotify_fd);
    st.inotify_fd = -1;
    return;
  }
  st.waiter = std::make_unique<FdWaiter>(
    std::vector<int>{st.inotify_fd},
    [addr = self->address()] {
      if (auto me = caf::actor_cast<caf::actor>(addr))
        caf::anon_send(me, tick_atom::value);
    },
    fallback_interval);
}

void drain_notifications(int inotify_fd) {
  alignas(inotify_event) char buf[4096];
  while (::read(inotify_fd, buf, sizeof buf) > 0) {
  }
}

// No more wake-ups; the capture itself stays open for the record.
void stop_following(console_tailer_state& st) {
  st.waiter.reset();  // first: it polls the inotify fd
  if (st.inotify_fd >= 0)
    ::close(st.inotify_fd);
  st.inotify_fd = -1;
}

void close_all(console_tailer_state& st) {
  stop_following(st);
  if (st.fd >= 0)
    ::close(st.fd);
  st.fd = -1;
}

}  // namespace

console_tailer_state::~console_tailer_state() {
  // The attempt ends its children after QEMU is gone: the rest of the capture
  // (written after the hand-off) completes the record. The capture may have been
  // removed with the VM's work directory already; the open descriptor still reads it.
  if (record)
    open_capture(*this);
  drain_into_record(*this);
  if (record)
    if (auto ok = record->finish(); !ok)
      spdlog::warn("console record: {}", ok.error().message);
  close_all(*this);
}

console_tailer_internal::behavior_type
console_tailer(tailer_pointer self, console_observer_actor observer, console_capture capture,
               console_wakeup wakeup) {
  self->state.observer = std::move(observer);
  self->state.use_inotify = wakeup == console_wakeup::inotify;
  self->state.path = std::move(capture.raw_path);
  if (!capture.record_path.empty()) {
    auto opened = RedactedFile::open(capture.record_path, std::move(capture.secrets),
                                     capture.record_max_bytes, "console_max_bytes");
    if (opened)
      self->state.record.emplace(std::move(*opened));
    else
      spdlog::warn("console record: {}", opened.error().message);
  }
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
        if (st.record) {
          stop_following(st);
          // The record goes on: the capture is drained into it now and then.
          self->delayed_send(self, drain_interval, tick_atom::value);
        } else {
          close_all(st);
        }
      }
      return stopped_atom::value;
    },
    [=](tick_atom) {
      auto& st = self->state;
      if (st.stopped) {
        if (st.record) {
          drain_into_record(st);
          self->delayed_send(self, drain_interval, tick_atom::value);
        }
        return;
      }
      if (st.waiter) {
        drain_notifications(st.inotify_fd);  // before reading: later growth wakes us again
        read_available(self);
        st.waiter->rearm();
        return;
      }
      bool was_open = st.fd >= 0;
      read_available(self);
      if (!was_open && st.fd >= 0 && st.use_inotify) {
        watch_file(self);
        read_available(self);  // what arrived before the watch was set
      }
      if (!st.waiter)
        self->delayed_send(self, poll_interval, tick_atom::value);
    },
  };
}

}  // namespace solstice
