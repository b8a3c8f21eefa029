#pragma once
// Harness of the reliability suite: runs the real `solstice-runner` binary as a
// child with its own state directory and job files, and looks at what it leaves:
// events, results, files, processes.
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "solstice.pb.h"

namespace solstice::reliability {

// The runner binary of this build and the built test guest.
std::filesystem::path runner_binary();
std::filesystem::path test_guest_dir();
// "" when the test guest is built, else why it is not usable.
std::string test_guest_problem();

// A running `solstice-runner`; its stdout and stderr are collected while waiting.
// The destructor kills and reaps it if it still runs.
class Runner {
 public:
  static Runner start(const std::vector<std::string>& args);
  // Any program (argv[0] looked up in PATH), watched the same way.
  static Runner start_program(const std::vector<std::string>& argv);
  Runner(Runner&&) = default;
  Runner& operator=(Runner&&) = default;

  pid_t pid() const { return child_.pid(); }
  // Collects output for up to `duration`, returning early when the runner exits.
  void pump(std::chrono::milliseconds duration);
  // The exit status once it exits within `timeout`.
  std::optional<ExitStatus> wait(std::chrono::milliseconds timeout);
  // Polls `condition` (every 100 ms) while collecting output; false at the timeout
  // or when the runner exited first.
  bool wait_until(const std::function<bool()>& condition, std::chrono::milliseconds timeout);
  void signal(int signal) { child_.kill(signal); }
  bool exited() const { return status_.has_value(); }
  const std::string& out() const { return out_; }
  const std::string& err() const { return err_; }
  // Both streams, for failure messages.
  std::string output() const { return "--- stdout:\n" + out_ + "\n--- stderr:\n" + err_; }

 private:
  explicit Runner(ChildProcess child) : child_(std::move(child)) {}
  ChildProcess child_;
  std::string out_, err_;
  std::optional<ExitStatus> status_;
};

// Runs the runner to its end (at most `timeout`) and returns it.
Runner run_to_end(const std::vector<std::string>& args, std::chrono::milliseconds timeout);

// A mkdtemp directory holding a state directory (`state/`, made by the runner
// itself) and the test's files. The destructor kills (by PID) any process whose
// command line still mentions the directory, then removes it.
class Sandbox {
 public:
  Sandbox();
  Sandbox(const Sandbox&) = delete;
  Sandbox& operator=(const Sandbox&) = delete;
  ~Sandbox();

  const std::filesystem::path& root() const { return root_; }
  std::filesystem::path state() const { return root_ / "state"; }
  std::filesystem::path job_dir(const std::string& id) const { return state() / "jobs" / id; }
  std::filesystem::path work_dir(const std::string& id) const { return state() / "run" / id; }

  // Writes root/name and returns its path.
  std::filesystem::path write(const std::string& name, const std::string& text) const;
  std::filesystem::path write_json(const std::string& name, const nlohmann::json& json) const;

  // `run JOB --state-dir STATE --accel ACCEL [--config CONFIG] extra... --cold`
  std::vector<std::string> run_args(const std::filesystem::path& job, const std::string& accel,
                                    const std::filesystem::path& config = {},
                                    const std::vector<std::string>& extra = {}) const;
  // The same without --cold: the configuration's snapshots (default auto) decide.
  std::vector<std::string> snapshot_run_args(const std::filesystem::path& job,
                                             const std::string& accel,
                                             const std::filesystem::path& config = {},
                                             const std::vector<std::string>& extra = {}) const;

  // PIDs of running processes (not zombies) whose command line mentions root().
  std::vector<pid_t> processes() const;
  // Entries left in state/run/.
  std::vector<std::string> run_entries() const;

  std::vector<v1::JobEvent> events(const std::string& id) const;
  std::optional<v1::JobResult> result(const std::string& id) const;
  // The state event's detail, e.g. WAITING_FOR_SSH → "127.0.0.1:PORT".
  std::optional<std::string> state_detail(const std::string& id, v1::JobState state) const;
  // Concatenated stdout of step `step`.
  std::string step_output(const std::string& id, uint32_t step) const;
  // The notices of the job.
  std::vector<std::string> notices(const std::string& id) const;

 private:
  std::filesystem::path root_;
};

// A job on the built test guest with the given step scripts.
nlohmann::json guest_job(const std::string& id, const std::vector<std::string>& scripts);

// The process is gone or a zombie.
bool process_gone(pid_t pid);
// File mode bits (0777 part), or -1.
int mode_of(const std::filesystem::path& path);

// What every test checks at its end: no process mentions the sandbox and state/run
// is empty. Uses doctest CHECKs.
void check_nothing_left(const Sandbox& sandbox);

std::string describe(const std::optional<ExitStatus>& status);

}  // namespace solstice::reliability
