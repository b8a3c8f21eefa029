#include "runtime/vm/identity_channel.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <thread>
#include <utility>

#include "runtime/base/clock.hpp"
#include "runtime/job/guest_commands.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// Poll slices: a cancel is seen within one.
constexpr auto poll_slice = 50ms;

bool cancelled(const std::atomic<bool>* cancel) { return cancel && cancel->load(); }

// Waits until `fd` is ready for `events`, the deadline passes or the flag is set.
Result<void> wait_for(int fd, short events, IdentityChannel::Deadline deadline,
                      const std::atomic<bool>* cancel, const char* what) {
  while (true) {
    if (cancelled(cancel))
      return fail("cancelled");
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left <= 0ms)
      return fail(std::string{"timed out while "} + what);
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, static_cast<int>(std::min<std::chrono::milliseconds>(left, poll_slice).count()));
    if (n < 0 && errno != EINTR)
      return fail(errno_message(std::string{"poll failed while "} + what, errno));
    if (n > 0)
      return {};
  }
}

// What the guest said, made safe to show: printable ASCII only, shortened.
std::string printable(const std::string& text, size_t max = 200) {
  std::string out;
  for (char c : text) {
    if (out.size() >= max) {
      out += "...";
      break;
    }
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  return out;
}

}  // namespace

IdentityChannel::IdentityChannel(IdentityChannel&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), buffered_(std::move(other.buffered_)) {}

IdentityChannel& IdentityChannel::operator=(IdentityChannel&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = std::exchange(other.fd_, -1);
    buffered_ = std::move(other.buffered_);
  }
  return *this;
}

IdentityChannel::~IdentityChannel() { close(); }

void IdentityChannel::close() {
  if (fd_ >= 0)
    ::close(fd_);
  fd_ = -1;
  buffered_.clear();
}

Result<IdentityChannel> IdentityChannel::connect(const std::filesystem::path& socket,
                                                 Deadline deadline, const std::atomic<bool>* cancel) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket.string().size() >= sizeof addr.sun_path)
    return fail("identity socket path " + socket.string() + " is too long for a unix socket");
  std::strncpy(addr.sun_path, socket.c_str(), sizeof addr.sun_path - 1);
  while (true) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
      return fail(errno_message("cannot make a unix socket", errno));
    // A connect to a listening unix socket completes at once (or fails).
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0)
      return IdentityChannel(fd);
    int err = errno;
    ::close(fd);
    if (err != ENOENT && err != ECONNREFUSED && err != EAGAIN)
      return fail(errno_message("cannot connect to the identity port " + socket.string(), err));
    if (cancelled(cancel))
      return fail("cancelled");
    if (Clock::now() >= deadline)
      return fail(errno_message("cannot connect to the identity port " + socket.string(), err));
    std::this_thread::sleep_for(20ms);
  }
}

Result<void> IdentityChannel::send_line(const std::string& line, Deadline deadline,
                                        const std::atomic<bool>* cancel) {
  if (fd_ < 0)
    return fail("the identity channel is closed");
  std::string bytes = line + "\n";
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t n = ::send(fd_, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (n > 0) {
      sent += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno != EAGAIN && errno != EINTR)
      return fail(errno_message("cannot write to the identity port", errno));
    if (auto ready = wait_for(fd_, POLLOUT, deadline, cancel, "writing to the identity port"); !ready)
      return ready;
  }
  return {};
}

Result<std::string> IdentityChannel::read_line(Deadline deadline, const std::atomic<bool>* cancel,
                                               size_t max_bytes) {
  if (fd_ < 0)
    return fail("the identity channel is closed");
  while (true) {
    if (auto end = buffered_.find('\n'); end != std::string::npos) {
      auto line = buffered_.substr(0, end);
      buffered_.erase(0, end + 1);
      return line;
    }
    if (buffered_.size() > max_bytes)
      return fail("the guest wrote a line longer than " + std::to_string(max_bytes) +
                  " bytes on the identity port");
    char buf[512];
    ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
    if (n > 0) {
      buffered_.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0)
      return fail("QEMU closed the identity port");
    if (errno != EAGAIN && errno != EINTR)
      return fail(errno_message("cannot read the identity port", errno));
    if (auto ready = wait_for(fd_, POLLIN, deadline, cancel, "waiting for the guest's answer"); !ready)
      return tl::unexpected(ready.error());
  }
}

GuestJobFiles guest_job_files(const v1::JobSpec& job) {
  GuestJobFiles files;
  for (const auto& upload : job.uploads())
    files.directories.push_back(std::filesystem::path(upload.destination()).parent_path().string());
  std::map<std::string, std::string> env(job.env().begin(), job.env().end());
  env["SOLSTICE_JOB_ID"] = job.id();
  std::map<std::string, std::string> secrets(job.secrets().begin(), job.secrets().end());
  files.env_file = make_env_file(env, secrets);
  if (step_scripts_fit(job))
    for (const auto& step : job.steps())
      files.step_scripts.push_back(make_step_script(step.script()));
  return files;
}

bool step_scripts_fit(const v1::JobSpec& job) {
  size_t bytes = 0;
  for (const auto& step : job.steps())
    bytes += step.script().size();
  return bytes <= step_scripts_max_bytes;
}

std::string clone_identity_input(const v1::VmHandle& handle,
                                 const std::optional<GuestJobFiles>& job_files) {
  GuestIdentity identity;
  identity.job_files = job_files;
  identity.authorized_key = handle.public_key();
  identity.host_key_private = handle.host_key_private();
  identity.host_key_public = handle.host_key_public();
  identity.hostname = guest_hostname(handle.job_id());
  identity.instance_id = "solstice-" + handle.job_id();
  identity.random_bytes.assign(64, '\0');
  std::ifstream random("/dev/urandom", std::ios::binary);
  random.read(identity.random_bytes.data(), static_cast<std::streamsize>(identity.random_bytes.size()));
  identity.unix_now_us = unix_now_us();
  return make_identity_input(identity);
}

Result<void> await_identity_agent(IdentityChannel& channel, IdentityChannel::Deadline deadline) {
  auto line = channel.read_line(deadline);
  if (!line)
    return fail("the identity agent did not say it is ready: " + line.error().message);
  if (*line != identity_ready_line)
    return fail("the identity agent said '" + printable(*line) + "' instead of '" +
                identity_ready_line + "'");
  return {};
}

Result<std::string> give_identity_over_channel(IdentityChannel& channel,
                                               const std::string& identity_input,
                                               IdentityChannel::Deadline deadline,
                                               const std::atomic<bool>* cancel) {
  if (auto sent = channel.send_line(identity_line(identity_input), deadline, cancel); !sent) {
    channel.close();
    return tl::unexpected(sent.error());
  }
  auto answer = channel.read_line(deadline, cancel);
  // One answer is all the runner reads: the host side closes now, whatever it was.
  channel.close();
  if (!answer)
    return fail("no answer from the guest's identity agent: " + answer.error().message);
  if (*answer == identity_ok_line)
    return std::string{};
  const std::string without_files = identity_ok_without_files_prefix;
  if (answer->rfind(without_files, 0) == 0) {
    auto why = printable(answer->substr(without_files.size()));
    return why.empty() ? std::string{"the agent did not say why"} : why;
  }
  const std::string failed = identity_failed_prefix;
  if (answer->rfind(failed, 0) == 0)
    return fail("the guest's identity agent failed: " + printable(answer->substr(failed.size())));
  return fail("the guest's identity agent answered '" + printable(*answer) + "'");
}

}  // namespace solstice
