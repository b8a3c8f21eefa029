#include "actors/host/runner_host.hpp"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/host/embedding.hpp"
#include "actors/runner_types.hpp"
#include "actors/sinks/terminal_printer.hpp"
#include "actors/vm/job_supervisor.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/job/disk_limits.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/job_claim.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace {

struct host_config : caf::actor_system_config {
  host_config() {
    add_runner_types(*this);
    // A local run needs few threads: the VM's actors are detached anyway.
    use_sleeping_scheduler(*this, 2);
  }
};

// Ctrl-C / SIGTERM: the first cancels the jobs, the second kills them at once.
class SignalWatcher {
 public:
  explicit SignalWatcher(std::vector<caf::actor> supervisors)
      : supervisors_(std::move(supervisors)) {
    thread_ = std::thread([this] { run(); });
  }
  ~SignalWatcher() {
    done_ = true;
    thread_.join();
  }
  bool killed() const { return killed_; }

 private:
  void run() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    const bool one = supervisors_.size() == 1;
    int count = 0;
    while (!done_) {
      timespec wait{0, 100 * 1000 * 1000};
      int sig = ::sigtimedwait(&set, nullptr, &wait);
      if (sig <= 0)
        continue;
      if (++count == 1) {
        if (::isatty(STDERR_FILENO))
          std::fputc('\n', stderr);  // after the terminal's ^C
        spdlog::warn(one ? "cancelling the job (interrupt again to kill it at once)"
                         : "cancelling the jobs (interrupt again to kill them at once)");
        for (const auto& supervisor : supervisors_)
          caf::anon_send(caf::actor_cast<job_supervisor_actor>(supervisor), cancel_atom::value);
      } else if (!killed_) {
        killed_ = true;
        if (::isatty(STDERR_FILENO))
          std::fputc('\n', stderr);
        spdlog::warn(one ? "killing the job's VM now" : "killing the jobs' VMs now");
        for (const auto& supervisor : supervisors_)
          caf::anon_send_exit(supervisor, caf::exit_reason::kill);
      }
    }
  }
  std::vector<caf::actor> supervisors_;
  std::atomic<bool> done_{false};
  std::atomic<bool> killed_{false};
  std::thread thread_;
};

// How long the terminal printer may take to show what it still holds once every
// job has ended (its backlog is bounded by the output flow control).
constexpr std::chrono::seconds printer_grace{60};


// What the terminal calls each job: its name, else its id; names that several
// jobs share get the job's position on the command line.
std::vector<std::string> job_labels(const std::vector<v1::JobSpec>& jobs) {
  std::vector<std::string> labels;
  std::map<std::string, int> uses;
  for (const auto& job : jobs) {
    labels.push_back(job.name().empty() ? job.id() : job.name());
    ++uses[labels.back()];
  }
  for (size_t i = 0; i < labels.size(); ++i)
    if (uses[labels[i]] > 1)
      labels[i] += " #" + std::to_string(i + 1);
  return labels;
}

std::string status_text(v1::JobStatus status) {
  switch (status) {
    case v1::SUCCEEDED: return "succeeded";
    case v1::FAILED: return "failed";
    case v1::TIMED_OUT: return "timed out";
    case v1::CANCELLED: return "cancelled";
    case v1::INVALID_INPUT: return "invalid input";
    default: return "infrastructure error";
  }
}

}  // namespace

const char* default_config_file() { return SOLSTICE_DEFAULT_CONFIG; }

Result<v1::RunnerConfig> load_effective_config(const std::string& config_file,
                                               const std::string& state_dir,
                                               const std::string& accel) {
  auto config = default_runner_config();
  // The installed configuration counts when no other is named.
  std::string file = config_file;
  if (file.empty() && std::filesystem::exists(default_config_file()))
    file = default_config_file();
  if (!file.empty()) {
    auto loaded = load_runner_config(file);
    if (!loaded)
      return tl::unexpected(loaded.error());
    config = *loaded;
  }
  if (!state_dir.empty())
    config.set_state_dir(std::filesystem::absolute(state_dir).string());
  if (!accel.empty())
    config.set_accel(accel);
  bool has_test_guest = false;
  for (const auto& image : config.images())
    has_test_guest |= image.label() == test_guest_label;
  if (!has_test_guest) {
    const char* env = std::getenv("SOLSTICE_TEST_GUEST_DIR");
    std::filesystem::path dir = env && *env ? env : SOLSTICE_DEFAULT_TEST_GUEST_DIR;
    if (auto image = load_test_guest_image(dir))
      *config.add_images() = *image;
  }
  // Labels pulled with `image pull`, and configured images pulled before.
  apply_image_cache(config);
  if (auto ok = validate_runner_config(config); !ok)
    return tl::unexpected(ok.error());
  return config;
}

int run_job_locally(v1::JobSpec job, const v1::RunnerConfig& config,
                    const LocalRunOptions& options) {
  std::vector<v1::JobSpec> jobs;
  jobs.push_back(std::move(job));
  return run_jobs_locally(std::move(jobs), config, options);
}

namespace {

// One `run` of one or more jobs: what its parts share.
struct LocalRun {
  LocalRun(std::vector<v1::JobSpec>& jobs, const v1::RunnerConfig& config,
           const LocalRunOptions& options)
      : jobs(jobs), config(config), options(options), several(jobs.size() > 1),
        results(jobs.size()) {}

  std::vector<v1::JobSpec>& jobs;
  const v1::RunnerConfig& config;
  const LocalRunOptions& options;
  const bool several;
  std::map<std::string, size_t> index_of;
  // Each job's claim of its id (held by its actors once it starts).
  std::vector<std::shared_ptr<JobClaim>> claims;
  std::vector<std::string> labels;
  std::vector<std::string> prefixes;
  // Filled by the printer's thread, read once it has gone.
  std::mutex results_mutex;
  std::vector<std::optional<v1::JobResult>> results;
};

// Gives every job an id of its own and a label.
void introduce_jobs(LocalRun& run) {
  auto& jobs = run.jobs;
  for (size_t i = 0; i < jobs.size(); ++i) {
    auto& job = jobs[i];
    while (job.id().empty() || run.index_of.count(job.id()))
      job.set_id(make_job_id());  // two made in one second could meet
    run.index_of[job.id()] = i;
  }
  run.labels = job_labels(jobs);
  for (const auto& label : run.labels)
    run.prefixes.push_back(run.several ? "[" + label + "] " : "");
}

// Claims every job's id before any job starts (see runtime/vm/job_claim.hpp).
// Returns 0, or the exit code when one is refused: then no job runs and the claims
// made so far are given back with their (still empty) records.
int claim_records(LocalRun& run) {
  int code = 0;
  for (size_t i = 0; i < run.jobs.size() && code == 0; ++i) {
    auto claim = JobClaim::take(run.config, run.jobs[i].id(), run.options.replace);
    if (claim) {
      run.claims.push_back(std::move(*claim));
      continue;
    }
    log_job(spdlog::level::err, run.jobs[i].id(), "{}{}", run.prefixes[i],
            claim.error().message);
    code = claim.error().kind == ClaimRefusal::Kind::failed ? exit_infrastructure_error
                                                            : exit_invalid_input;
  }
  if (code != 0)
    for (auto& claim : run.claims)
      claim->remove_record();
  return code;
}

// Says where each job's record goes.
void announce_jobs(const LocalRun& run) {
  const auto& jobs = run.jobs;
  if (!run.options.json)
    for (size_t i = 0; i < jobs.size(); ++i)
      std::printf("%sjob %s: %s\n%s  record: %s\n", run.prefixes[i].c_str(), jobs[i].id().c_str(),
                  jobs[i].name().empty() ? "(unnamed)" : jobs[i].name().c_str(),
                  run.prefixes[i].c_str(), job_dir_for(run.config, jobs[i].id()).c_str());
  std::fflush(stdout);
}

// Waits until every supervisor has ended; meanwhile an interrupt cancels the jobs
// and a second one kills them. Returns whether they were killed.
bool wait_for_supervisors(caf::actor_system& sys, const std::vector<caf::actor>& supervisors) {
  SignalWatcher watcher{supervisors};
  caf::scoped_actor self{sys};
  for (const auto& supervisor : supervisors)
    self->monitor(supervisor);
  size_t down = 0;
  self->receive_while([&] { return down < supervisors.size(); })(
    [&](caf::down_msg&) { ++down; });
  return watcher.killed();
}

// A supervisor killed before it could report took its VM actors with it (they
// kill QEMU and remove their files as they stop). A job that had reported already
// keeps its own result: sinks take only the first.
void report_killed_jobs(const LocalRun& run, const std::vector<std::optional<StartedJob>>& started,
                        const event_sink_actor& printer) {
  for (size_t i = 0; i < run.jobs.size(); ++i) {
    if (!started[i])
      continue;
    const auto& id = run.jobs[i].id();
    auto event = stand_in_result(id, UINT64_MAX, v1::CANCELLED, "killed by a second interrupt",
                                 "job " + id + " cancelled: killed by a second interrupt");
    event.mutable_result()->set_shutdown_method("kill");
    caf::anon_send(started[i]->recorder, event_atom::value, event);
    caf::anon_send(printer, event_atom::value, event);
  }
}

// The printer quits once every job's result is shown. A job that somehow ended
// without one must not keep the runner waiting for ever.
void wait_for_printer(caf::actor_system& sys, const event_sink_actor& printer) {
  caf::scoped_actor self{sys};
  self->monitor(printer);
  bool printer_done = false;
  self->receive([&](caf::down_msg&) { printer_done = true; },
                caf::after(printer_grace) >> [] {});
  if (!printer_done) {
    spdlog::warn("the terminal output did not end within {} s after the last job; stopping it",
                 static_cast<long long>(printer_grace.count()));
    caf::anon_send_exit(printer, caf::exit_reason::kill);
  }
}

// Runs the jobs in one actor system, all their events going to one terminal
// printer, which fills run.results. Returns whether any job started.
bool run_in_actor_system(LocalRun& run) {
  const auto& jobs = run.jobs;
  host_config cfg;
  caf::actor_system sys{cfg};
  std::vector<printed_job> shown;
  for (size_t i = 0; i < jobs.size(); ++i) {
    printed_job view;
    view.job_id = jobs[i].id();
    view.prefix = run.prefixes[i];
    view.step_count = static_cast<uint32_t>(jobs[i].steps_size());
    shown.push_back(std::move(view));
  }
  auto printer = sys.spawn<caf::detached>(
    jobs_terminal_printer, run.options.json, run.options.show_console, std::move(shown),
    [&run](const v1::JobResult& result) {
      std::lock_guard<std::mutex> lock{run.results_mutex};
      auto found = run.index_of.find(result.job_id());
      if (found != run.index_of.end() && !run.results[found->second])
        run.results[found->second] = result;
    });
  std::vector<std::optional<StartedJob>> started(jobs.size());
  std::vector<caf::actor> supervisors;
  for (size_t i = 0; i < jobs.size(); ++i) {
    auto job = start_job(sys, jobs[i], run.config, printer, std::move(run.claims[i]));
    if (job) {
      supervisors.push_back(caf::actor_cast<caf::actor>(job->supervisor));
      started[i] = std::move(*job);
      continue;
    }
    log_job(spdlog::level::err, run.jobs[i].id(), "{}{}", run.prefixes[i], job.error().message);
    // The others run on; this one ends here, and the printer is told so.
    if (run.several)
      caf::anon_send(printer, event_atom::value,
                     stand_in_result(jobs[i].id(), UINT64_MAX, v1::INFRASTRUCTURE_ERROR,
                                     job.error().message,
                                     "job " + jobs[i].id() + " could not start"));
  }
  const bool started_any = !supervisors.empty();
  if (!started_any && !run.several) {
    caf::anon_send_exit(printer, caf::exit_reason::user_shutdown);
  } else if (started_any) {
    if (wait_for_supervisors(sys, supervisors))
      report_killed_jobs(run, started, printer);
    wait_for_printer(sys, printer);
  }
  return started_any;
}

// One line per job at the very end, where a CI log is read first. With --json it
// goes to stderr: stdout holds JSON lines only.
void print_summary(const LocalRun& run, const std::vector<int>& codes, int exit_code,
                   size_t deciding) {
  const auto& jobs = run.jobs;
  size_t failed = 0, width = 0;
  for (size_t i = 0; i < jobs.size(); ++i) {
    failed += codes[i] != 0;
    width = std::max(width, run.labels[i].size() + 2);
  }
  std::string text = "\n" + std::to_string(jobs.size()) + " jobs: " +
                     std::to_string(jobs.size() - failed) + " succeeded, " +
                     std::to_string(failed) + " did not";
  if (exit_code != 0)
    text += "; exit code " + std::to_string(exit_code) + " from " + run.labels[deciding];
  text += "\n";
  for (size_t i = 0; i < jobs.size(); ++i) {
    auto label = "[" + run.labels[i] + "]";
    label.resize(width, ' ');
    char rest[64];
    std::snprintf(rest, sizeof rest, " %-21s exit %-4d  ",
                  run.results[i] ? status_text(run.results[i]->status()).c_str() : "no result",
                  codes[i]);
    text += "  " + label + rest + job_dir_for(run.config, jobs[i].id()).string() + "\n";
  }
  std::fputs(text.c_str(), run.options.json ? stderr : stdout);
  std::fflush(run.options.json ? stderr : stdout);
}

// The run's exit code: that of the first job (in command-line order) that did
// not succeed, else 0.
int finish_run(LocalRun& run) {
  std::lock_guard<std::mutex> lock{run.results_mutex};
  std::vector<int> codes;
  for (size_t i = 0; i < run.jobs.size(); ++i) {
    if (!run.results[i])
      log_job(spdlog::level::err, run.jobs[i].id(), "{}job {} ended without a result",
              run.prefixes[i], run.jobs[i].id());
    codes.push_back(run.results[i] ? exit_code_for(*run.results[i]) : exit_infrastructure_error);
  }
  int exit_code = 0;
  size_t deciding = 0;
  for (size_t i = 0; i < codes.size() && exit_code == 0; ++i)
    if (codes[i] != 0) {  // every status but succeeded has a non-zero code
      exit_code = codes[i];
      deciding = i;
    }
  if (run.several)
    print_summary(run, codes, exit_code, deciding);
  return exit_code;
}

}  // namespace

int run_jobs_locally(std::vector<v1::JobSpec> jobs, const v1::RunnerConfig& config,
                     const LocalRunOptions& options) {
  if (jobs.empty())
    return exit_invalid_input;
  LocalRun run{jobs, config, options};
  introduce_jobs(run);
  // Before any record is made: a full disk refuses the whole run.
  if (auto room = check_free_space(config); !room) {
    std::fprintf(stderr, "solstice-runner: %s\n", room.error().message.c_str());
    return exit_infrastructure_error;
  }
  if (int refused = claim_records(run); refused != 0)
    return refused;
  announce_jobs(run);

  // Signals go to the watcher thread only: block them before any thread exists.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  const bool started_any = run_in_actor_system(run);
  pthread_sigmask(SIG_UNBLOCK, &signals, nullptr);
  if (!started_any && !run.several)
    return exit_infrastructure_error;
  return finish_run(run);
}

}  // namespace solstice
