#pragma once
// Inside the SSH session (not a public header): the non-blocking libssh2 driver
// and the connection state that ssh_connect.cpp, ssh_exec.cpp and ssh_sftp.cpp
// share. Everything here is used from one thread at a time.
#include <libssh2.h>
#include <libssh2_sftp.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <functional>
#include <string>

#include "runtime/base/error.hpp"
#include "runtime/ssh/ssh_session.hpp"

namespace solstice::ssh_internal {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// SFTP buffer. libssh2 pipelines only within one sftp_write/sftp_read call: it
// splits the buffer into ~30 KB requests and keeps them all in flight. 1 MiB
// uploads 128 MiB into the TCG guest at 10.7 MiB/s against 9.3 with 64 KiB
// (4 MiB: 10.3).
inline constexpr size_t kSftpBufferSize = 1024 * 1024;
// Longest single wait, so cancel flags and give-up callbacks are seen promptly.
inline constexpr auto kPollSlice = 50ms;
// SFTP transfers fail when the server makes no progress for this long.
inline constexpr auto kTransferStallTimeout = 60s;
// Bounded waits for housekeeping (closing channels, killing a timed-out command).
inline constexpr auto kCloseTimeout = 5s;

// Our own return codes for waits that end without libssh2 finishing.
inline constexpr int kDeadlinePassed = INT_MIN + 1;
inline constexpr int kGivenUp = INT_MIN + 2;

// libssh2_init, once per process.
Result<void> init_libssh2();

// The session's last error as text, with libssh2's code.
std::string libssh2_error(LIBSSH2_SESSION* session);

// "123 ms".
std::string milliseconds_text(Clock::duration duration);

// Waits until the socket is ready in the direction(s) libssh2 is blocked on, or
// `until` passes.
void wait_socket(int fd, LIBSSH2_SESSION* session, Clock::time_point until);

// Drives one non-blocking libssh2 call to completion: repeats it while it returns
// EAGAIN, waiting on the socket in between, until `deadline` or `stop()`.
struct Driver {
  int fd;
  LIBSSH2_SESSION* session;
  Clock::time_point deadline;
  const std::function<bool()>* stop = nullptr;

  template <class Step>
  int run(Step&& step) const {
    for (;;) {
      int rc = step();
      if (rc != LIBSSH2_ERROR_EAGAIN) return rc;
      if (stop && *stop && (*stop)()) return kGivenUp;
      auto now = Clock::now();
      if (now >= deadline) return kDeadlinePassed;
      wait_socket(fd, session, std::min(deadline, now + kPollSlice));
    }
  }

  // For calls that return a pointer (NULL + last errno EAGAIN while pending).
  template <class T, class Step>
  T* open(Step&& step, int& rc) const {
    T* result = nullptr;
    rc = run([&]() -> int {
      result = step();
      if (result) return 0;
      int code = libssh2_session_last_errno(session);
      return code == 0 ? LIBSSH2_ERROR_SOCKET_NONE : code;
    });
    return result;
  }

  std::string describe(int rc, const std::string& what) const {
    if (rc == kDeadlinePassed) return what + ": timed out";
    if (rc == kGivenUp) return what + ": stopped";
    return what + ": " + libssh2_error(session);
  }
};

// Everything one SSH connection holds, with the helpers the public calls share.
struct Connection {
  int fd = -1;
  LIBSSH2_SESSION* session = nullptr;
  LIBSSH2_SFTP* sftp = nullptr;
  std::string host_key;
  std::string peer;  // "user@host:port", for messages

  Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection();

  Driver driver(Clock::time_point deadline, const std::function<bool()>* stop = nullptr) const {
    return Driver{fd, session, deadline, stop};
  }

  // The connection's SFTP subsystem, started on first use.
  Result<LIBSSH2_SFTP*> sftp_session();

  // "No such file" and friends, from the SFTP status of the last failed request.
  std::string sftp_error() const;

  void close_sftp_handle(LIBSSH2_SFTP_HANDLE* handle);

  // Closes and frees a channel, waiting a bounded time for the server's close.
  void close_channel(LIBSSH2_CHANNEL* channel, Clock::time_point deadline);

  // Kills the remote command's process group (or, if it leads none, the process)
  // through a second channel.
  void kill_remote(long pid);
};

}  // namespace solstice::ssh_internal

namespace solstice {
struct SshSession::Impl : ssh_internal::Connection {};
}  // namespace solstice
