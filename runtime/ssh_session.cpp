#include "runtime/ssh_session.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <libssh2.h>
#include <libssh2_sftp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "runtime/ssh_keys.hpp"

namespace solstice {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Output read buffer: bounds memory however large the stream is.
constexpr size_t kChunkSize = 64 * 1024;
// SFTP buffer. libssh2 pipelines only within one sftp_write/sftp_read call: it
// splits the buffer into ~30 KB requests and keeps them all in flight. 1 MiB
// uploads 128 MiB into the TCG guest at 10.7 MiB/s against 9.3 with 64 KiB
// (4 MiB: 10.3).
constexpr size_t kSftpBufferSize = 1024 * 1024;
// Longest single wait, so cancel flags and give-up callbacks are seen promptly.
constexpr auto kPollSlice = 50ms;
// SFTP transfers fail when the server makes no progress for this long.
constexpr auto kTransferStallTimeout = 60s;
// Bounded waits for housekeeping (closing channels, killing a timed-out command).
constexpr auto kCloseTimeout = 5s;

// Our own return codes for waits that end without libssh2 finishing.
constexpr int kDeadlinePassed = INT_MIN + 1;
constexpr int kGivenUp = INT_MIN + 2;

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

// Linux signal numbers (the guest's numbering, not necessarily the host's).
int signal_number(std::string name) {
  if (name.rfind("SIG", 0) == 0) name.erase(0, 3);
  if (auto at = name.find('@'); at != std::string::npos) name.erase(at);
  static const std::array<std::pair<const char*, int>, 31> table{{
      {"HUP", 1},   {"INT", 2},     {"QUIT", 3},  {"ILL", 4},     {"TRAP", 5},   {"ABRT", 6},
      {"BUS", 7},   {"FPE", 8},     {"KILL", 9},  {"USR1", 10},   {"SEGV", 11},  {"USR2", 12},
      {"PIPE", 13}, {"ALRM", 14},   {"TERM", 15}, {"STKFLT", 16}, {"CHLD", 17},  {"CONT", 18},
      {"STOP", 19}, {"TSTP", 20},   {"TTIN", 21}, {"TTOU", 22},   {"URG", 23},   {"XCPU", 24},
      {"XFSZ", 25}, {"VTALRM", 26}, {"PROF", 27}, {"WINCH", 28},  {"IO", 29},    {"PWR", 30},
      {"SYS", 31},
  }};
  for (const auto& [known, number] : table)
    if (name == known) return number;
  return 0;
}

std::string shell_single_quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) {
    if (c == '\'')
      quoted += "'\\''";
    else
      quoted += c;
  }
  return quoted + "'";
}

// The remote command is wrapped so that its PID reaches us before anything else,
// in-band at the start of stderr ("\x1e<pid>\x1e"), letting a timed-out or cancelled
// command be killed with its whole process group through a second channel. `exec`
// keeps that PID the command's own, so its exit status and signal are unchanged.
// Some servers (dropbear) leave the command in the connection's own process group:
// there the command first becomes a group leader through setsid(1), which then
// needs no fork (it only forks when the caller already leads a group).
std::string wrap_command(const std::string& command) {
  return "c=" + shell_single_quote(command) +
         "; printf '\\036%s\\036' \"$$\" >&2"
         "; read -r _ _ _ _ g _ </proc/$$/stat 2>/dev/null"
         "; if [ \"$g\" != \"$$\" ] && command -v setsid >/dev/null 2>&1; then"
         " exec setsid \"${SHELL:-/bin/sh}\" -c \"$c\"; fi"
         "; exec \"${SHELL:-/bin/sh}\" -c \"$c\"";
}

// Takes the PID prefix off the start of the stderr stream.
class RemotePidReader {
 public:
  // The part of `chunk` that is the command's own stderr (may be empty). The view
  // stays valid until the next call.
  std::string_view feed(std::string_view chunk) {
    if (done_) return chunk;
    pending_.append(chunk);
    if (pending_.empty()) return {};
    if (pending_[0] != '\x1e') return finish();
    auto end = pending_.find('\x1e', 1);
    if (end == std::string::npos) {
      if (pending_.size() > 32) return finish();  // not our prefix after all
      return {};
    }
    std::string digits = pending_.substr(1, end - 1);
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
      return finish();
    pid_ = std::atol(digits.c_str());
    done_ = true;
    return std::string_view(pending_).substr(end + 1);
  }
  // At end of stream: whatever was held back.
  std::string_view flush() { return done_ ? std::string_view{} : finish(); }
  long pid() const { return pid_; }

 private:
  std::string_view finish() {
    done_ = true;
    return pending_;
  }
  std::string pending_;
  bool done_ = false;
  long pid_ = 0;
};

Result<int> tcp_connect(const std::string& host, uint16_t port, Clock::time_point deadline,
                        const std::function<bool()>* stop) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  std::string where = host + ":" + std::to_string(port);
  if (int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found); rc != 0)
    return fail("cannot resolve SSH host " + where + ": " + gai_strerror(rc));
  std::string last_error = "no address";
  for (addrinfo* address = found; address; address = address->ai_next) {
    int fd = ::socket(address->ai_family, address->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                      address->ai_protocol);
    if (fd < 0) {
      last_error = errno_message("socket", errno);
      continue;
    }
    int rc = ::connect(fd, address->ai_addr, address->ai_addrlen);
    if (rc != 0 && errno != EINPROGRESS) {
      last_error = errno_message("connect", errno);
      ::close(fd);
      continue;
    }
    bool connected = rc == 0;
    while (!connected) {
      if (stop && *stop && (*stop)()) {
        last_error = "connect: stopped";
        break;
      }
      auto now = Clock::now();
      if (now >= deadline) {
        last_error = "connect: timed out";
        break;
      }
      auto slice =
          std::chrono::duration_cast<std::chrono::milliseconds>(std::min(deadline - now,
                                                                         Clock::duration(kPollSlice)));
      pollfd entry{fd, POLLOUT, 0};
      if (::poll(&entry, 1, static_cast<int>(slice.count()) + 1) <= 0) continue;
      int socket_error = 0;
      socklen_t length = sizeof socket_error;
      ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &socket_error, &length);
      if (socket_error != 0) {
        last_error = errno_message("connect", socket_error);
        break;
      }
      connected = true;
    }
    if (connected) {
      ::freeaddrinfo(found);
      return fd;
    }
    ::close(fd);
  }
  ::freeaddrinfo(found);
  return fail("TCP connect to " + where + " failed: " + last_error);
}

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

  ~Connection() {
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

  Driver driver(Clock::time_point deadline, const std::function<bool()>* stop = nullptr) const {
    return Driver{fd, session, deadline, stop};
  }

  Result<LIBSSH2_SFTP*> sftp_session() {
    if (sftp) return sftp;
    int rc = 0;
    sftp = driver(Clock::now() + kTransferStallTimeout)
               .open<LIBSSH2_SFTP>([&] { return libssh2_sftp_init(session); }, rc);
    if (!sftp)
      return fail("cannot start SFTP on " + peer + " (does the guest have an SFTP server?): " +
                  driver(Clock::time_point{}).describe(rc, "sftp init"));
    return sftp;
  }

  // "No such file" and friends, from the SFTP status of the last failed request.
  std::string sftp_error() const {
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

  void close_sftp_handle(LIBSSH2_SFTP_HANDLE* handle) {
    driver(Clock::now() + kCloseTimeout).run([&] { return libssh2_sftp_close_handle(handle); });
  }

  // Closes and frees a channel, waiting a bounded time for the server's close.
  void close_channel(LIBSSH2_CHANNEL* channel, Clock::time_point deadline) {
    auto io = driver(deadline);
    io.run([&] { return libssh2_channel_close(channel); });
    io.run([&] { return libssh2_channel_wait_closed(channel); });
    driver(std::max(deadline, Clock::now() + 1s)).run([&] { return libssh2_channel_free(channel); });
  }

  // Kills the remote command's process group (or, if it leads none, the process)
  // through a second channel.
  void kill_remote(long pid) {
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
};

}  // namespace

struct SshSession::Impl : Connection {};

SshSession::SshSession() = default;
SshSession::SshSession(SshSession&&) noexcept = default;
SshSession& SshSession::operator=(SshSession&&) noexcept = default;
SshSession::~SshSession() = default;

std::string SshSession::host_key() const { return impl_ ? impl_->host_key : std::string(); }

namespace {

struct AttemptFailure {
  std::string message;
  bool timed_out = false;
};

// One connection attempt into `impl`, bounded by `deadline` and `stop`.
tl::expected<void, AttemptFailure> connect_once(Connection& connection, const SshTarget& target,
                                                Clock::time_point deadline,
                                                const std::function<bool()>* stop,
                                                Clock::duration banner_wait = Clock::duration::max()) {
  std::string where = target.host + ":" + std::to_string(target.port);
  auto failure = [&](std::string message, bool timed_out = false) {
    return tl::unexpected<AttemptFailure>{AttemptFailure{std::move(message), timed_out}};
  };
  if (target.user.empty()) return failure("SSH target " + where + " has no user name");
  if (target.private_key.empty())
    return failure("SSH target " + where + " has no private key for user '" + target.user + "'");
  if (auto init = init_libssh2(); !init) return failure(init.error().message);

  auto fd = tcp_connect(target.host, target.port, deadline, stop);
  if (!fd) return failure(fd.error().message, Clock::now() >= deadline);
  // An SSH server speaks first. A forward that stays silent (QEMU's user network
  // while the guest's network is not up) is dropped soon and tried afresh: a new
  // connection sends a new SYN at once instead of waiting out TCP's backoff.
  if (banner_wait != Clock::duration::max()) {
    auto until = std::min(deadline, Clock::now() + banner_wait);
    pollfd readable{*fd, POLLIN, 0};
    int ready = 0;
    while ((ready = ::poll(&readable, 1, 20)) == 0 && Clock::now() < until &&
           !(stop && *stop && (*stop)())) {
    }
    if (ready <= 0) {
      ::close(*fd);
      return failure("TCP connected to " + where +
                     ", but no SSH server spoke yet (no handshake started)");
    }
  }

  Connection* impl = &connection;
  impl->fd = *fd;
  impl->peer = target.user + "@" + where;
  impl->session = libssh2_session_init();
  if (!impl->session) return failure("cannot create a libssh2 session for " + where);
  libssh2_session_set_blocking(impl->session, 0);
  // Real images have several host keys; ask for the type of the pinned one, or a
  // server would present another type and look like a mismatch.
  const auto& pinned = target.expected_host_key;
  if (pinned.size() > 4) {
    uint32_t length = (uint32_t(uint8_t(pinned[0])) << 24) | (uint32_t(uint8_t(pinned[1])) << 16) |
                      (uint32_t(uint8_t(pinned[2])) << 8) | uint32_t(uint8_t(pinned[3]));
    if (length > 0 && length < 64 && pinned.size() >= 4 + length) {
      std::string type = pinned.substr(4, length);
      libssh2_session_method_pref(impl->session, LIBSSH2_METHOD_HOSTKEY, type.c_str());
    }
  }
  auto io = impl->driver(deadline, stop);

  int rc = io.run([&] { return libssh2_session_handshake(impl->session, impl->fd); });
  if (rc != 0) {
    if (rc == kDeadlinePassed)
      return failure("SSH handshake with " + where +
                         " did not complete in time (TCP connected, but no or slow SSH server)",
                     true);
    return failure(io.describe(rc, "SSH handshake with " + where + " failed"));
  }

  size_t key_length = 0;
  int key_type = 0;
  const char* key = libssh2_session_hostkey(impl->session, &key_length, &key_type);
  if (!key || key_length == 0) return failure("SSH server " + where + " presented no host key");
  impl->host_key.assign(key, key_length);
  if (!target.expected_host_key.empty() && impl->host_key != target.expected_host_key)
    return failure("host key mismatch for " + where + ": expected " +
                   fingerprint_sha256(target.expected_host_key) + " got " +
                   fingerprint_sha256(impl->host_key));

  const char* public_key = target.public_key.empty() ? nullptr : target.public_key.data();
  rc = io.run([&] {
    return libssh2_userauth_publickey_frommemory(
        impl->session, target.user.data(), target.user.size(), public_key,
        target.public_key.size(), target.private_key.data(), target.private_key.size(), nullptr);
  });
  if (rc != 0) {
    if (rc == kDeadlinePassed)
      return failure("public key authentication as '" + target.user + "' on " + where +
                         " did not complete in time",
                     true);
    return failure(io.describe(rc, "public key authentication as '" + target.user + "' on " +
                                       where + " failed"));
  }
  return {};
}

}  // namespace

Result<SshSession> SshSession::connect(const SshTarget& target,
                                       std::chrono::milliseconds timeout) {
  auto impl = std::make_unique<Impl>();
  auto connected = connect_once(*impl, target, Clock::now() + timeout, nullptr);
  if (!connected) return fail(connected.error().message);
  SshSession session;
  session.impl_ = std::move(impl);
  return session;
}

Result<SshSession> SshSession::wait_until_ready(const SshTarget& target,
                                                Clock::time_point deadline,
                                                std::chrono::milliseconds interval,
                                                const std::function<bool()>& give_up) {
  std::string where = target.user + "@" + target.host + ":" + std::to_string(target.port);
  auto started = Clock::now();
  // A forward can accept and then stay silent (e.g. QEMU's user network while the
  // guest's network is not up yet): bound each attempt, longer after timeouts so a
  // slow emulated guest still completes its handshake.
  Clock::duration attempt_limit = 2s;
  std::string last_error = "no attempt was made";
  // An attempt that the overall deadline cut short says less than the one before.
  bool last_cut_short = false;
  bool server_spoke = false;
  int attempts = 0;
  for (;;) {
    if (give_up && give_up())
      return fail("gave up waiting for SSH on " + where + " after " + std::to_string(attempts) +
                  " attempt(s) in " + milliseconds_text(Clock::now() - started) +
                  "; last attempt: " + last_error);
    auto now = Clock::now();
    if (now >= deadline)
      return fail("SSH on " + where + " was not ready by the deadline (" +
                  std::to_string(attempts) + " attempt(s) in " +
                  milliseconds_text(now - started) + "); last attempt: " + last_error +
                  (last_cut_short ? " (a later attempt was cut short by the deadline)" : ""));
    auto attempt_deadline = std::min(deadline, now + attempt_limit);
    auto impl = std::make_unique<Impl>();
    // Short banner waits first (the silent phase of a boot), longer ones later
    // so a very slow emulated guest still gets its banner out.
    auto banner_wait = attempts < 20 ? Clock::duration(500ms) : attempt_limit;
    auto attempt = connect_once(*impl, target, attempt_deadline, &give_up, banner_wait);
    ++attempts;
    if (attempt) {
      SshSession session;
      session.impl_ = std::move(impl);
      return session;
    }
    bool cut_short = attempt.error().timed_out && attempt_deadline == deadline && attempts > 1;
    // A silent forward says less than what a server that spoke said before it
    // (e.g. an authentication failure, then a server throttling new connections).
    bool silent = attempt.error().message.find("no SSH server spoke yet") != std::string::npos;
    if (!cut_short && !(silent && server_spoke)) last_error = attempt.error().message;
    if (!silent) server_spoke = true;
    last_cut_short = cut_short;
    if (attempt.error().timed_out) attempt_limit = std::min<Clock::duration>(attempt_limit * 2, 16s);
    auto next = std::min(deadline, Clock::now() + interval);
    while (Clock::now() < next && !(give_up && give_up()))
      std::this_thread::sleep_for(std::min<Clock::duration>(next - Clock::now(), kPollSlice));
  }
}

Result<ExecOutcome> SshSession::exec(
    const std::string& command, const std::function<void(SshStream, std::string_view)>& on_output,
    const ExecOptions& options) {
  if (!impl_ || !impl_->session) return fail("exec on a closed SSH session: " + command);
  Impl& ssh = *impl_;
  auto deadline = options.timeout.count() > 0 ? Clock::now() + options.timeout
                                              : Clock::time_point::max();
  std::function<bool()> cancelled = [&] { return options.cancel && options.cancel->load(); };
  auto io = ssh.driver(deadline, &cancelled);

  std::string_view input = options.input;
  bool input_open = true;  // EOF not sent yet
  // A channel write (or EOF) that returned EAGAIN with the socket full is half
  // sent: libssh2 (1.10) refuses every other packet, a window adjustment made by a
  // read included, until the same call has finished it.
  bool half_sent = false;
  LIBSSH2_CHANNEL* channel = nullptr;

  // Writes as much input as the channel's window takes now, then EOF once all is
  // written. Returns whether anything moved.
  auto feed_input = [&]() -> Result<bool> {
    auto blocked = [&] {
      half_sent = libssh2_session_block_directions(ssh.session) & LIBSSH2_SESSION_BLOCK_OUTBOUND;
    };
    bool moved = false;
    for (;;) {
      if (input.empty()) {
        int rc = libssh2_channel_send_eof(channel);
        if (rc == LIBSSH2_ERROR_EAGAIN) {
          blocked();
          return moved;
        }
        half_sent = false;
        if (rc != 0 && !libssh2_channel_eof(channel))
          return fail(io.describe(rc, "cannot close the command's stdin on " + ssh.peer +
                                          " (command: " + command + ")"));
        input_open = false;
        return true;
      }
      ssize_t n = libssh2_channel_write(channel, input.data(), input.size());
      if (n == LIBSSH2_ERROR_EAGAIN) {
        blocked();
        return moved;
      }
      half_sent = false;
      if (n == 0) return moved;  // the window is full
      if (n < 0) {
        // The command is gone (its channel closed): the rest of its input is moot.
        if (n == LIBSSH2_ERROR_CHANNEL_CLOSED || n == LIBSSH2_ERROR_CHANNEL_EOF_SENT ||
            libssh2_channel_eof(channel)) {
          input = {};
          input_open = false;
          return true;
        }
        return fail(io.describe(static_cast<int>(n), "writing the command's stdin on " +
                                                         ssh.peer + " (command: " + command + ")"));
      }
      input.remove_prefix(static_cast<size_t>(n));
      moved = true;
    }
  };
  // Before the channel is closed or another is opened (bounded wait).
  auto finish_half_sent = [&] {
    ssh.driver(Clock::now() + kCloseTimeout).run([&]() -> int {
      if (half_sent) (void)feed_input();
      return half_sent ? LIBSSH2_ERROR_EAGAIN : 0;
    });
  };

  auto stopped_outcome = [&](long remote_pid) {
    ExecOutcome outcome;
    outcome.exit_code = -1;
    outcome.cancelled = cancelled();
    outcome.timed_out = !outcome.cancelled;
    finish_half_sent();
    ssh.kill_remote(remote_pid);
    if (channel) ssh.close_channel(channel, Clock::now() + kCloseTimeout);
    return outcome;
  };
  auto failed = [&](int rc, const std::string& what) {
    std::string message = io.describe(rc, what + " on " + ssh.peer + " (command: " + command + ")");
    if (channel) ssh.close_channel(channel, Clock::now() + kCloseTimeout);
    return fail(message);
  };

  int rc = 0;
  channel = io.open<LIBSSH2_CHANNEL>([&] { return libssh2_channel_open_session(ssh.session); }, rc);
  if (!channel) {
    if (rc == kDeadlinePassed || rc == kGivenUp) return stopped_outcome(0);
    return failed(rc, "cannot open an SSH channel");
  }
  std::string wrapped = wrap_command(command);
  rc = io.run([&] { return libssh2_channel_exec(channel, wrapped.c_str()); });
  if (rc == kDeadlinePassed || rc == kGivenUp) return stopped_outcome(0);
  if (rc != 0) return failed(rc, "cannot start the command");
  // Without input the command gets an empty stdin rather than one that never ends.
  if (input.empty()) {
    rc = io.run([&] { return libssh2_channel_send_eof(channel); });
    if (rc == kDeadlinePassed || rc == kGivenUp) return stopped_outcome(0);
    if (rc != 0) return failed(rc, "cannot close the command's stdin");
    input_open = false;
  }

  RemotePidReader pid_reader;
  std::vector<char> buffer(kChunkSize);
  auto deliver = [&](SshStream stream, std::string_view bytes) {
    if (!bytes.empty() && on_output) on_output(stream, bytes);
  };
  // Input and output are interleaved: a command may write more than the channel's
  // window holds before it reads all of its input.
  for (;;) {
    if (cancelled() || Clock::now() >= deadline) return stopped_outcome(pid_reader.pid());
    bool progressed = false;
    if (input_open) {
      auto fed = feed_input();
      if (!fed) {
        ssh.close_channel(channel, Clock::now() + kCloseTimeout);
        return fail(fed.error().message);
      }
      progressed = *fed;
    }
    // Nothing else may be sent until a half-sent packet is finished: wait for the
    // socket to take more (wait_socket below polls for writing then).
    if (half_sent) {
      if (!progressed)
        wait_socket(ssh.fd, ssh.session, std::min(deadline, Clock::now() + kPollSlice));
      continue;
    }
    for (int stream_id : {0, SSH_EXTENDED_DATA_STDERR}) {
      ssize_t n = libssh2_channel_read_ex(channel, stream_id, buffer.data(), buffer.size());
      if (n == LIBSSH2_ERROR_EAGAIN || n == 0) continue;
      if (n < 0) return failed(static_cast<int>(n), "reading the command's output");
      std::string_view bytes(buffer.data(), static_cast<size_t>(n));
      if (stream_id == 0)
        deliver(SshStream::out, bytes);
      else
        deliver(SshStream::err, pid_reader.feed(bytes));
      progressed = true;
    }
    if (progressed) continue;
    if (libssh2_channel_eof(channel)) break;
    wait_socket(ssh.fd, ssh.session, std::min(deadline, Clock::now() + kPollSlice));
  }
  deliver(SshStream::err, pid_reader.flush());

  // The exit status arrives with (or just before) the server's close.
  auto close_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(30));
  auto closing = ssh.driver(close_deadline, &cancelled);
  rc = closing.run([&] { return libssh2_channel_close(channel); });
  if (rc == 0) rc = closing.run([&] { return libssh2_channel_wait_closed(channel); });
  if (rc == kGivenUp || (rc == kDeadlinePassed && close_deadline == deadline))
    return stopped_outcome(pid_reader.pid());
  if (rc != 0) return failed(rc, "waiting for the command's channel to close");

  ExecOutcome outcome;
  outcome.exit_code = libssh2_channel_get_exit_status(channel);
  char* signal = nullptr;
  size_t signal_length = 0;
  libssh2_channel_get_exit_signal(channel, &signal, &signal_length, nullptr, nullptr, nullptr,
                                  nullptr);
  if (signal) {
    outcome.exit_signal.assign(signal, signal_length);
    libssh2_free(ssh.session, signal);
  }
  if (!outcome.exit_signal.empty()) {
    // libssh2 reports status 0 for a killed command; report it as a shell would.
    int number = signal_number(outcome.exit_signal);
    outcome.exit_code = number > 0 ? 128 + number : 255;
  }
  ssh.driver(Clock::now() + kCloseTimeout).run([&] { return libssh2_channel_free(channel); });
  return outcome;
}

namespace {

// Why an SFTP read or write failed: a stalled transfer, or the server's error.
std::string transfer_failure(Connection& ssh, int rc) {
  return rc == kDeadlinePassed
           ? "no progress for " + milliseconds_text(kTransferStallTimeout)
           : ssh.sftp_error();
}

// Writes all of `data` to an SFTP handle, handling partial writes.
Result<void> sftp_write_all(Connection& ssh, LIBSSH2_SFTP_HANDLE* handle,
                            std::string_view data, const std::string& remote_path) {
  while (!data.empty()) {
    ssize_t written = 0;
    int rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&]() -> int {
      written = libssh2_sftp_write(handle, data.data(), data.size());
      return written < 0 ? static_cast<int>(written) : 0;
    });
    if (rc != 0)
      return fail("writing " + remote_path + " on " + ssh.peer + " failed: " +
                  transfer_failure(ssh, rc));
    data.remove_prefix(static_cast<size_t>(written));
  }
  return {};
}

// Shared by upload() and upload_file(): `produce` fills the buffer and returns the
// number of bytes (0 at the end) or an error.
Result<void> upload_stream(Connection& ssh, const std::string& remote_path, int mode,
                           size_t total_size,
                           const std::function<Result<size_t>(std::vector<char>&)>& produce) {
  auto sftp = ssh.sftp_session();
  if (!sftp) return fail(sftp.error().message);
  int rc = 0;
  auto* handle = ssh.driver(Clock::now() + kTransferStallTimeout)
                     .open<LIBSSH2_SFTP_HANDLE>(
                         [&] {
                           return libssh2_sftp_open_ex(
                               *sftp, remote_path.data(),
                               static_cast<unsigned>(remote_path.size()),
                               LIBSSH2_FXF_WRITE | LIBSSH2_FXF_CREAT | LIBSSH2_FXF_TRUNC, mode,
                               LIBSSH2_SFTP_OPENFILE);
                         },
                         rc);
  if (!handle)
    return fail("cannot create " + remote_path + " on " + ssh.peer + ": " +
                (rc == kDeadlinePassed ? std::string("timed out") : ssh.sftp_error()));
  // Small files need no big buffer.
  std::vector<char> buffer(std::clamp<size_t>(total_size, 1, kSftpBufferSize));
  for (;;) {
    auto produced = produce(buffer);
    if (!produced) {
      ssh.close_sftp_handle(handle);
      return fail(produced.error().message);
    }
    if (*produced == 0) break;
    auto written =
        sftp_write_all(ssh, handle, std::string_view(buffer.data(), *produced), remote_path);
    if (!written) {
      ssh.close_sftp_handle(handle);
      return written;
    }
  }
  rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&] {
    return libssh2_sftp_close_handle(handle);
  });
  if (rc != 0)
    return fail("closing " + remote_path + " on " + ssh.peer + " failed: " + ssh.sftp_error());
  // The server's umask may have stripped bits from the mode given at open.
  LIBSSH2_SFTP_ATTRIBUTES attributes{};
  attributes.flags = LIBSSH2_SFTP_ATTR_PERMISSIONS;
  attributes.permissions = static_cast<unsigned long>(mode);
  rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&] {
    return libssh2_sftp_stat_ex(*sftp, remote_path.data(),
                                static_cast<unsigned>(remote_path.size()), LIBSSH2_SFTP_SETSTAT,
                                &attributes);
  });
  if (rc != 0) {
    char octal[16];
    std::snprintf(octal, sizeof octal, "%04o", static_cast<unsigned>(mode));
    return fail("chmod " + std::string(octal) + " " + remote_path + " on " + ssh.peer +
                " failed: " + ssh.sftp_error());
  }
  return {};
}

}  // namespace

Result<void> SshSession::upload(const std::string& content, const std::string& remote_path,
                                int mode) {
  if (!impl_ || !impl_->session) return fail("upload of " + remote_path + " on a closed SSH session");
  size_t offset = 0;
  return upload_stream(*impl_, remote_path, mode, content.size(),
                       [&](std::vector<char>& buffer) -> Result<size_t> {
    size_t count = std::min(buffer.size(), content.size() - offset);
    std::memcpy(buffer.data(), content.data() + offset, count);
    offset += count;
    return count;
  });
}

Result<void> SshSession::upload_file(const std::filesystem::path& local,
                                     const std::string& remote_path, int mode) {
  if (!impl_ || !impl_->session) return fail("upload of " + remote_path + " on a closed SSH session");
  int fd = ::open(local.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail(errno_message("cannot open " + local.string() + " for upload", errno));
  struct stat info {};
  const size_t size = ::fstat(fd, &info) == 0 ? static_cast<size_t>(info.st_size) : kSftpBufferSize;
  auto result =
      upload_stream(*impl_, remote_path, mode, size, [&](std::vector<char>& buffer) -> Result<size_t> {
        for (;;) {
          ssize_t n = ::read(fd, buffer.data(), buffer.size());
          if (n >= 0) return static_cast<size_t>(n);
          if (errno != EINTR) return fail(errno_message("reading " + local.string(), errno));
        }
      });
  ::close(fd);
  return result;
}

Result<void> SshSession::download(const std::string& remote_path,
                                  const std::filesystem::path& local) {
  if (!impl_ || !impl_->session)
    return fail("download of " + remote_path + " on a closed SSH session");
  Impl& ssh = *impl_;
  auto sftp = ssh.sftp_session();
  if (!sftp) return fail(sftp.error().message);
  int rc = 0;
  auto* handle = ssh.driver(Clock::now() + kTransferStallTimeout)
                     .open<LIBSSH2_SFTP_HANDLE>(
                         [&] {
                           return libssh2_sftp_open_ex(*sftp, remote_path.data(),
                                                       static_cast<unsigned>(remote_path.size()),
                                                       LIBSSH2_FXF_READ, 0, LIBSSH2_SFTP_OPENFILE);
                         },
                         rc);
  if (!handle)
    return fail("cannot download " + remote_path + " from " + ssh.peer + ": " +
                (rc == kDeadlinePassed ? std::string("timed out") : ssh.sftp_error()));

  // Written under a temporary name and renamed, so `local` is whole or absent.
  std::filesystem::path directory = local.has_parent_path() ? local.parent_path() : ".";
  std::string temporary = (directory / ("." + local.filename().string() + ".partial-XXXXXX")).string();
  int fd = ::mkostemp(temporary.data(), O_CLOEXEC);
  if (fd < 0) {
    ssh.close_sftp_handle(handle);
    return fail(errno_message("cannot create a file next to " + local.string(), errno));
  }
  auto abandon = [&](std::string message) {
    ::close(fd);
    ::unlink(temporary.c_str());
    ssh.close_sftp_handle(handle);
    return fail(std::move(message));
  };
  std::vector<char> buffer(kSftpBufferSize);
  for (;;) {
    ssize_t received = 0;
    rc = ssh.driver(Clock::now() + kTransferStallTimeout).run([&]() -> int {
      received = libssh2_sftp_read(handle, buffer.data(), buffer.size());
      return received < 0 ? static_cast<int>(received) : 0;
    });
    if (rc != 0)
      return abandon("reading " + remote_path + " from " + ssh.peer + " failed: " +
                     transfer_failure(ssh, rc));
    if (received == 0) break;
    const char* data = buffer.data();
    size_t left = static_cast<size_t>(received);
    while (left > 0) {
      ssize_t n = ::write(fd, data, left);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return abandon(errno_message("writing " + temporary, errno));
      data += n;
      left -= static_cast<size_t>(n);
    }
  }
  if (::fchmod(fd, 0644) != 0 || ::close(fd) != 0) {
    int error = errno;
    ::unlink(temporary.c_str());
    ssh.close_sftp_handle(handle);
    return fail(errno_message("finishing " + temporary, error));
  }
  ssh.close_sftp_handle(handle);
  if (::rename(temporary.c_str(), local.c_str()) != 0) {
    int error = errno;
    ::unlink(temporary.c_str());
    return fail(errno_message("cannot move the download of " + remote_path + " to " + local.string(),
                              error));
  }
  return {};
}

}  // namespace solstice
