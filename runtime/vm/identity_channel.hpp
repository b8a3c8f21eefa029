#pragma once
// The host side of a restored clone's identity port: a virtio-serial port named
// identity_port_name (qemu_argv.hpp) whose host end is a socket QEMU listens on.
// The runner's agent in the guest (guest_commands.hpp, identity_agent_command) is
// blocked reading one line from that port when the template is saved, so every
// clone wakes up with it. The runner sends the clone's identity as that line and
// waits for the agent's status line; only then does it connect over SSH, already
// with the job's key, pinning the new host key: one SSH handshake instead of two.
//
// The protocol, one line each way (nothing else the guest writes is trusted):
//   agent -> runner  "solstice-identity ready"           (once, at the template build)
//   runner -> agent  identity_line(make_identity_input(...))  (once per clone)
//   agent -> runner  "solstice-identity ok", or "solstice-identity ok without job
//                    files: <why>" (the identity given, the job's files not made),
//                    or "solstice-identity failed: <why>"
//
// Blocking calls with a deadline and a cancel flag: run them on a worker thread.
#include <atomic>
#include <chrono>
#include <filesystem>
#include <optional>
#include <string>

#include "runtime/base/error.hpp"
#include "runtime/job/guest_commands.hpp"  // GuestJobFiles, the agent's status lines
#include "solstice.pb.h"

namespace solstice {

inline constexpr const char* identity_ready_line = "solstice-identity ready";

class IdentityChannel {
 public:
  using Deadline = std::chrono::steady_clock::time_point;

  IdentityChannel() = default;
  IdentityChannel(IdentityChannel&& other) noexcept;
  IdentityChannel& operator=(IdentityChannel&& other) noexcept;
  ~IdentityChannel();

  // Connects to QEMU's socket, retrying while it is not there yet (QEMU makes it
  // as it starts) until `deadline`.
  static Result<IdentityChannel> connect(const std::filesystem::path& socket, Deadline deadline,
                                         const std::atomic<bool>* cancel = nullptr);

  // Writes `line` and a newline.
  Result<void> send_line(const std::string& line, Deadline deadline,
                         const std::atomic<bool>* cancel = nullptr);
  // The next line (without its newline), at most `max_bytes` long.
  Result<std::string> read_line(Deadline deadline, const std::atomic<bool>* cancel = nullptr,
                                size_t max_bytes = 1024);
  void close();
  bool is_open() const { return fd_ >= 0; }

 private:
  explicit IdentityChannel(int fd) : fd_(fd) {}
  int fd_ = -1;
  std::string buffered_;
};

// What the set-up makes for `job` in the guest: the directories of its uploads and
// its env file (env, SOLSTICE_JOB_ID, secrets); the identity agent also the steps'
// scripts, where they fit (step_scripts_fit).
GuestJobFiles guest_job_files(const v1::JobSpec& job);
// Whether `job`'s step scripts go with its files: together at most step_scripts_max_bytes.
bool step_scripts_fit(const v1::JobSpec& job);

// The identity a restored clone of `handle` gets (its job's key only, the handle's
// host key, its job's hostname and instance id, the host's clock now and 64 bytes
// of host randomness, and `job_files` when given), as make_identity_input's text:
// the stdin of identity_command over SSH, or the line sent over the channel (identity_line).
std::string clone_identity_input(const v1::VmHandle& handle,
                                 const std::optional<GuestJobFiles>& job_files = std::nullopt);

// The template build: waits for the agent's ready line.
Result<void> await_identity_agent(IdentityChannel& channel, IdentityChannel::Deadline deadline);

// A clone: sends `identity_input` (make_identity_input's text) as one line (identity_line),
// waits for the agent's status line and closes the channel. The identity is
// given: "" when the agent made the input's job files too, else why not (then
// the set-up makes them). The error says what the agent answered (printable
// characters only, shortened) or that it did not.
Result<std::string> give_identity_over_channel(IdentityChannel& channel,
                                               const std::string& identity_input,
                                               IdentityChannel::Deadline deadline,
                                               const std::atomic<bool>* cancel = nullptr);

}  // namespace solstice
