// The libssh2 driver: process-wide init, error text, socket waits, and the
// connection's shared helpers (SFTP start-up and errors, closing channels and
// handles, killing a remote command).
#include "runtime/ssh/ssh_connection.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <mutex>

namespace solstice::ssh_internal {

Result<void> init_libssh2() {
  static std::once_flag once;
  static int init_rc = 0;
  std::call_once(once, [] { init_rc = libssh2_init(0); });
  if (init_rc != 0) return fail("libssh2_init failed with code " + std::to_string(init_rc));
  return {};
}

std::string libssh2_error(LIBSSH2_SESSION* session) {
  char* text = nullptr;
  int length = 0;
  int code = libssh2_session_last_error(session, &text, &length, 0);
  std::string message = (text && length > 0) ? std::string(text, static_cast<size_t>(length))
                                             : std::string("unknown error");
  return message + " (libssh2 error " + std::to_string(code) + ")";
}

std::string milliseconds_text(Clock::duration duration) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(duration).count()) +
         " ms";
}

// Waits until the socket is ready in the direction(s) libssh2 is blocked on, or
// `until` passes.
void wait_socket(int fd, LIBSSH2_SESSION* session, Clock::time_point until) {
  int directions = libssh2_session_block_directions(session);
  short events = 0;
  if (directions & LIBSSH2_SESSION_BLOCK_INBOUND) events |= POLLIN;
  if (directions & LIBSSH2_SESSION_BLOCK_OUTBOUND) events |= POLLOUT;
  if (events == 0) events = POLLIN;
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now());
  pollfd entry{fd, events, 0};
  ::poll(&entry, 1, static_cast<int>(std::clamp<long long>(left.count(), 0, 1000)));
}

Connection::~Connection() {
  if (session) {
    // Blocking mode with a timeout: the goodbye may not hang a destructor.
    libssh2_session_set_blocking(session, 1);
    libssh2_session_set_timeout(session, 2000);
    if (sftp) libssh2_sftp_shutdown(sftp);
    libssh2_session_disconnect(session, "closing");
    libssh2_session_free(session);
  }
  if (fd >= 0) ::close(fd);
}


Result<LIBSSH2_SFTP*> Connection::sftp_session() {
  if (sftp) return sftp;
  int rc = 0;
  sftp = driver(Clock::now() + kTransferStallTimeout)
             .open<LIBSSH2_SFTP>([&] { return libssh2_sftp_init(session); }, rc);
  if (!sftp)
    return fail("cannot start SFTP on " + peer + " (does the guest have an SFTP server?): " +
                driver(Clock::time_point{}).describe(rc, "sftp init"));
  return sftp;
}

std::string Connection::sftp_error() const {
  int code = libssh2_session_last_errno(session);
  if (code != LIBSSH2_ERROR_SFTP_PROTOCOL || !sftp) return libssh2_error(session);
  switch (libssh2_sftp_last_error(sftp)) {
    case LIBSSH2_FX_NO_SUCH_FILE: return "no such file";
    case LIBSSH2_FX_PERMISSION_DENIED: return "permission denied";
    case LIBSSH2_FX_NO_SUCH_PATH: return "no such path";
    case LIBSSH2_FX_FILE_ALREADY_EXISTS: return "file already exists";
    case LIBSSH2_FX_WRITE_PROTECT: return "write protected";
    case LIBSSH2_FX_NO_SPACE_ON_FILESYSTEM: return "no space left on the guest's file system";
    case LIBSSH2_FX_QUOTA_EXCEEDED: return "quota exceeded";
    case LIBSSH2_FX_NOT_A_DIRECTORY: return "not a directory";
    default: return "SFTP status " + std::to_string(libssh2_sftp_last_error(sftp));
  }
}

void Connection::close_sftp_handle(LIBSSH2_SFTP_HANDLE* handle) {
  driver(Clock::now() + kCloseTimeout).run([&] { return libssh2_sftp_close_handle(handle); });
}

void Connection::close_channel(LIBSSH2_CHANNEL* channel, Clock::time_point deadline) {
  auto io = driver(deadline);
  io.run([&] { return libssh2_channel_close(channel); });
  io.run([&] { return libssh2_channel_wait_closed(channel); });
  driver(std::max(deadline, Clock::now() + 1s)).run([&] { return libssh2_channel_free(channel); });
}

void Connection::kill_remote(long pid) {
  if (pid <= 0) return;
  auto deadline = Clock::now() + kCloseTimeout;
  auto io = driver(deadline);
  int rc = 0;
  auto* channel =
      io.open<LIBSSH2_CHANNEL>([&] { return libssh2_channel_open_session(session); }, rc);
  if (!channel) return;
  std::string p = std::to_string(pid);
  std::string command = "kill -KILL -" + p + " 2>/dev/null || kill -KILL " + p + " 2>/dev/null";
  if (io.run([&] { return libssh2_channel_exec(channel, command.c_str()); }) == 0) {
    std::array<char, 1024> sink{};
    io.run([&]() -> int {
      for (int stream : {0, SSH_EXTENDED_DATA_STDERR}) {
        ssize_t n;
        while ((n = libssh2_channel_read_ex(channel, stream, sink.data(), sink.size())) > 0) {
        }
      }
      return libssh2_channel_eof(channel) ? 0 : LIBSSH2_ERROR_EAGAIN;
    });
  }
  close_channel(channel, deadline);
}

}  // namespace solstice::ssh_internal
