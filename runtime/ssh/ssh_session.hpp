#pragma once
// One libssh2 session to a guest: readiness, auth, exec with streamed output,
// SFTP put/get. All calls block: never call them on CAF's shared scheduler threads.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "runtime/base/error.hpp"

namespace solstice {

// How the error of a download larger than its max_bytes starts.
inline constexpr std::string_view download_too_large = "file larger than the bytes left for it: ";


struct SshTarget {
  std::string host = "127.0.0.1";
  uint16_t port = 22;
  std::string user;
  std::string private_key;        // OpenSSH private key text (in memory only)
  std::string public_key;         // its OpenSSH public line
  std::string expected_host_key;  // wire-format blob; empty = do not check
};

enum class SshStream { out, err };

struct ExecOutcome {
  int exit_code = 0;         // 128+N when killed by signal N; -1 when timed out/cancelled
  std::string exit_signal;   // "KILL" etc., empty when it exited normally
  bool timed_out = false;
  bool cancelled = false;
};

struct ExecOptions {
  std::chrono::milliseconds timeout{0};      // 0 = none
  const std::atomic<bool>* cancel = nullptr;  // checked at least every 50 ms
  // Bytes written to the command's stdin, which then ends (EOF). Must outlive exec().
  std::string_view input;
};

class SshSession {
 public:
  SshSession();
  SshSession(SshSession&&) noexcept;
  SshSession& operator=(SshSession&&) noexcept;
  ~SshSession();

  // One attempt: TCP connect, handshake, host key check, public key auth.
  static Result<SshSession> connect(const SshTarget& target, std::chrono::milliseconds timeout);

  // Polls connect() every `interval` until it succeeds, `deadline` passes, or
  // `give_up()` returns true (e.g. QEMU exited). The error says why it stopped and
  // what the last attempt met. With `server_listening` (the guest has said its SSH
  // server listens, e.g. a restored clone's identity agent), a connection is given
  // the whole attempt to speak instead of being dropped as a silent forward.
  static Result<SshSession> wait_until_ready(const SshTarget& target,
                                             std::chrono::steady_clock::time_point deadline,
                                             std::chrono::milliseconds interval,
                                             const std::function<bool()>& give_up,
                                             bool server_listening = false);

  // Runs `command` with the user's login shell; its stdin is `options.input`,
  // then EOF (empty by default). stdout/stderr chunks go to `on_output` as they
  // arrive, also while the input is still being written (no deadlock with a
  // command that writes before it has read everything). A command that exits
  // without reading all its input is not an error: the rest is dropped.
  // On timeout or cancel the command's process group (or, if it leads none, the
  // process) is killed with SIGKILL through a second channel, and its channel
  // is closed.
  Result<ExecOutcome> exec(const std::string& command,
                           const std::function<void(SshStream, std::string_view)>& on_output,
                           const ExecOptions& options = {});

  Result<void> upload(const std::string& content, const std::string& remote_path, int mode);
  Result<void> upload_file(const std::filesystem::path& local, const std::string& remote_path,
                           int mode);
  // At most max_bytes: a larger file is not kept (nothing of it stays at `local`)
  // and the error starts with download_too_large.
  Result<void> download(const std::string& remote_path, const std::filesystem::path& local,
                        uint64_t max_bytes = UINT64_MAX);

  // Server host key as presented (wire format).
  std::string host_key() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace solstice
