#pragma once
// Real `solstice-runner` processes for the cluster tests: a child whose stdout and
// stderr are collected as they come, waits with deadlines, and a temporary
// directory for state, job files and certificates.
#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "runtime/base/child_process.hpp"

namespace solstice::cluster_testing {

using Clock = std::chrono::steady_clock;

std::filesystem::path runner_binary();
// The example embedding host (examples/embedded_host) of this build.
std::filesystem::path embedded_host_binary();

// A mkdtemp directory, removed with everything in it by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

void write_text(const std::filesystem::path& path, const std::string& text);

// One runner process. The destructor SIGKILLs it if it still runs (its QEMU
// children die with it).
class RunnerProcess {
 public:
  explicit RunnerProcess(std::vector<std::string> args);
  // Another program of this build (e.g. the embedded host) with the same handling.
  RunnerProcess(const std::filesystem::path& program, std::vector<std::string> args);
  RunnerProcess(RunnerProcess&&) = default;
  RunnerProcess& operator=(RunnerProcess&&) = default;

  bool started() const { return child_.pid() > 0; }
  std::string start_error;
  pid_t pid() const { return child_.pid(); }

  // Collects what the child wrote so far.
  void pump();
  const std::string& out() { pump(); return out_; }
  const std::string& err() { pump(); return err_; }

  // Waits until stdout or stderr contains `text`; false at the deadline or
  // when the process ended without writing it.
  bool wait_for_output(const std::string& text, std::chrono::milliseconds timeout);
  // Waits for the exit; nullopt if it still runs at the deadline.
  std::optional<ExitStatus> wait_exit(std::chrono::milliseconds timeout);
  std::optional<ExitStatus> status() const { return status_; }
  int exit_code() const { return status_ && !status_->signaled ? status_->code : -1; }
  void kill(int signal) { child_.kill(signal); }

  // Exit status and output tails, for failure messages.
  std::string describe();

 private:
  ChildProcess child_;
  std::string out_, err_;
  bool out_open_ = true, err_open_ = true;
  std::optional<ExitStatus> status_;
};

// A plain (--insecure) coordinator and one node, node-1, with one slot on TCG and
// its state in dir/state; both stopped with SIGTERM by the destructor.
struct OneNodeCluster {
  TempDir dir;
  RunnerProcess coordinator;
  std::string endpoint;
  std::optional<RunnerProcess> node;
  std::filesystem::path state;

  OneNodeCluster();
  ~OneNodeCluster();
  // `submit` of a job file, as a process whose output is read only when asked.
  RunnerProcess submit(const std::filesystem::path& job);
};

// Whether a QEMU process still names `needle` (a state dir) on its command line.
bool qemu_mentions(const std::string& needle);

// The "HOST:PORT" a coordinator printed on its first line, once it is listening.
std::optional<std::string> coordinator_endpoint(RunnerProcess& coordinator,
                                                std::chrono::milliseconds timeout);

}  // namespace solstice::cluster_testing
