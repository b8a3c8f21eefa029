// Connecting: TCP connect, SSH handshake, host key check, public key auth, and
// waiting for a booting guest's SSH server to get that far.
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>

#include "runtime/ssh/ssh_connection.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/ssh/ssh_session.hpp"

namespace solstice {

using namespace ssh_internal;

SshSession::SshSession() = default;
SshSession::SshSession(SshSession&&) noexcept = default;
SshSession& SshSession::operator=(SshSession&&) noexcept = default;
SshSession::~SshSession() = default;

std::string SshSession::host_key() const { return impl_ ? impl_->host_key : std::string(); }

namespace {

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

struct AttemptFailure {
  std::string message;
  bool timed_out = false;
};

// Whether the server at `fd` sent anything (its banner) before `until` or `stop()`.
bool server_spoke(int fd, Clock::time_point until, const std::function<bool()>* stop) {
  pollfd readable{fd, POLLIN, 0};
  int ready = 0;
  while ((ready = ::poll(&readable, 1, 20)) == 0 && Clock::now() < until &&
         !(stop && *stop && (*stop)())) {
  }
  return ready > 0;
}

// Real images have several host keys; ask for the type of the pinned one (a
// wire-format blob; empty when none is pinned), or a server would present another
// type and look like a mismatch.
void prefer_host_key_type_of(LIBSSH2_SESSION* session, const std::string& pinned) {
  if (pinned.size() > 4) {
    uint32_t length = (uint32_t(uint8_t(pinned[0])) << 24) | (uint32_t(uint8_t(pinned[1])) << 16) |
                      (uint32_t(uint8_t(pinned[2])) << 8) | uint32_t(uint8_t(pinned[3]));
    if (length > 0 && length < 64 && pinned.size() >= 4 + length) {
      std::string type = pinned.substr(4, length);
      libssh2_session_method_pref(session, LIBSSH2_METHOD_HOSTKEY, type.c_str());
    }
  }
}

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
  if (banner_wait != Clock::duration::max() &&
      !server_spoke(*fd, std::min(deadline, Clock::now() + banner_wait), stop)) {
    ::close(*fd);
    return failure("TCP connected to " + where +
                   ", but no SSH server spoke yet (no handshake started)");
  }

  Connection* impl = &connection;
  impl->fd = *fd;
  impl->peer = target.user + "@" + where;
  impl->session = libssh2_session_init();
  if (!impl->session) return failure("cannot create a libssh2 session for " + where);
  libssh2_session_set_blocking(impl->session, 0);
  prefer_host_key_type_of(impl->session, target.expected_host_key);
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
                                                const std::function<bool()>& give_up,
                                                bool server_listening) {
  std::string where = target.user + "@" + target.host + ":" + std::to_string(target.port);
  auto started = Clock::now();
  // A forward can accept and then stay silent (e.g. QEMU's user network while the
  // guest's network is not up yet): bound each attempt, longer after timeouts so a
  // slow emulated guest still completes its handshake.
  // A server known to listen is never dropped early: OpenSSH re-executes sshd for
  // every connection, which with several emulated guests per core takes seconds,
  // and each dropped attempt leaves one more sshd starting in the guest.
  Clock::duration attempt_limit = server_listening ? Clock::duration(15s) : Clock::duration(2s);
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
    auto banner_wait = attempts < 20 && !server_listening ? Clock::duration(500ms) : attempt_limit;
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
    if (attempt.error().timed_out || (silent && server_listening)) attempt_limit = std::min<Clock::duration>(attempt_limit * 2, 16s);
    auto next = std::min(deadline, Clock::now() + interval);
    while (Clock::now() < next && !(give_up && give_up()))
      std::this_thread::sleep_for(std::min<Clock::duration>(next - Clock::now(), kPollSlice));
  }
}

}  // namespace solstice
