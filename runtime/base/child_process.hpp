#pragma once
// Child processes: spawn with stdout/stderr captured, exit code or signal reported,
// children that die with the runner, no zombies.
#include <sys/types.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"

namespace solstice {

struct ExitStatus {
  bool signaled = false;
  int code = 0;    // exit code when !signaled
  int signal = 0;  // signal number when signaled
  // "exit code 3" or "signal 9 (KILL)".
  std::string describe() const;
};

// "KILL" for SIGKILL; "SIG<n>" when unknown.
std::string signal_name(int signal);

// Who a child runs as; set in the child after fork, before exec (needs root).
struct ProcessCredentials {
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;  // supplementary groups (e.g. kvm for /dev/kvm)
};

struct SpawnOptions {
  bool capture_stdout = true;   // else /dev/null
  bool capture_stderr = true;   // else /dev/null
  // Kill the child when the runner process dies (works no matter which thread
  // spawned it).
  bool die_with_parent = true;
  // Run as another user: groups, gid, then uid are set in the child before exec.
  std::optional<ProcessCredentials> run_as;
  // Descriptors the child inherits, as 3, 4, ... in this order (at most 8).
  std::vector<int> pass_fds;
};

class ChildProcess {
 public:
  ChildProcess() = default;
  ChildProcess(ChildProcess&&) noexcept;
  ChildProcess& operator=(ChildProcess&&) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  // Kills (SIGKILL) and reaps a child still running.
  ~ChildProcess();

  // argv[0] is looked up in PATH. A missing binary is an error naming it.
  static Result<ChildProcess> spawn(const std::vector<std::string>& argv,
                                    const SpawnOptions& options = {});

  pid_t pid() const { return pid_; }
  // Read ends (non-blocking, close-on-exec) or -1; owned by this object.
  int stdout_fd() const { return stdout_fd_; }
  int stderr_fd() const { return stderr_fd_; }
  // A pidfd that becomes readable when the child exits (-1 if unsupported).
  int exit_fd() const { return pidfd_; }

  // Non-blocking: the exit status once the child has exited (reaps it).
  std::optional<ExitStatus> try_wait();
  // Blocks up to `timeout`; nullopt if still running.
  std::optional<ExitStatus> wait_for(std::chrono::milliseconds timeout);
  bool running();
  // Sends a signal if still running.
  void kill(int signal);

 private:
  pid_t pid_ = -1;
  int stdout_fd_ = -1;
  int stderr_fd_ = -1;
  int pidfd_ = -1;
  std::optional<ExitStatus> status_;
  void close_fds();
};

}  // namespace solstice
