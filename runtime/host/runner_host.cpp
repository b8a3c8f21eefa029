#include "runtime/host/runner_host.hpp"

#include <pthread.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <future>
#include <random>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>

#include "actors/job_supervisor.hpp"
#include "actors/runner_types.hpp"
#include "actors/terminal_printer.hpp"
#include "runtime/host/embedding.hpp"
#include "runtime/job_file.hpp"
#include "runtime/runner_config.hpp"
#include "runtime/vm_prepare.hpp"

namespace solstice {

namespace {

struct host_config : caf::actor_system_config {
  host_config() {
    add_runner_types(*this);
    // A local run needs few threads: the VM's actors are detached anyway. The
    // sharing policy sleeps on a condition variable when idle; work stealing
    // polls, which costs a core per worker while output streams.
    set("scheduler.max-threads", 2);
    set("scheduler.policy", caf::atom("sharing"));
  }
};

// Ctrl-C / SIGTERM: the first cancels the job, the second kills it at once.
class SignalWatcher {
 public:
  SignalWatcher(caf::actor supervisor) : supervisor_(std::move(supervisor)) {
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
    int count = 0;
    while (!done_) {
      timespec wait{0, 100 * 1000 * 1000};
      int sig = ::sigtimedwait(&set, nullptr, &wait);
      if (sig <= 0)
        continue;
      if (++count == 1) {
        std::fprintf(stderr,
                     "\nsolstice-runner: cancelling the job (interrupt again to kill it at once)\n");
        caf::anon_send(caf::actor_cast<job_supervisor_actor>(supervisor_), cancel_atom::value);
      } else if (!killed_) {
        killed_ = true;
        std::fprintf(stderr, "\nsolstice-runner: killing the job's VM now\n");
        caf::anon_send_exit(supervisor_, caf::exit_reason::kill);
      }
    }
  }
  caf::actor supervisor_;
  std::atomic<bool> done_{false};
  std::atomic<bool> killed_{false};
  std::thread thread_;
};

}  // namespace

int exit_code_for(const v1::JobResult& result) {
  switch (result.status()) {
    case v1::SUCCEEDED: return 0;
    case v1::FAILED: return result.exit_code() != 0 ? result.exit_code() : 1;
    case v1::TIMED_OUT: return exit_timed_out;
    case v1::CANCELLED: return exit_cancelled;
    default: return exit_infrastructure_error;
  }
}

Result<v1::RunnerConfig> load_effective_config(const std::string& config_file,
                                               const std::string& state_dir,
                                               const std::string& accel) {
  auto config = default_runner_config();
  if (!config_file.empty()) {
    auto loaded = load_runner_config(config_file);
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
  if (auto ok = validate_runner_config(config); !ok)
    return tl::unexpected(ok.error());
  return config;
}

int run_job_locally(v1::JobSpec job, const v1::RunnerConfig& config,
                    const LocalRunOptions& options) {
  if (job.id().empty())
    job.set_id(make_job_id());
  if (!options.json)
    std::printf("job %s: %s\n  record: %s\n", job.id().c_str(),
                job.name().empty() ? "(unnamed)" : job.name().c_str(),
                job_dir_for(config, job.id()).c_str());
  std::fflush(stdout);

  // Signals go to the watcher thread only: block them before any thread exists.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::promise<v1::JobResult> result_promise;
  auto result_future = result_promise.get_future();
  bool killed = false;
  bool started_ok = true;
  {
    host_config cfg;
    caf::actor_system sys{cfg};
    auto printer = sys.spawn<caf::detached>(
      terminal_printer, options.json, options.show_console,
      static_cast<uint32_t>(job.steps_size()),
      [&result_promise](const v1::JobResult& result) { result_promise.set_value(result); });
    auto started = start_job(sys, job, config, printer);
    if (!started) {
      std::fprintf(stderr, "solstice-runner: %s\n", started.error().message.c_str());
      caf::anon_send_exit(printer, caf::exit_reason::user_shutdown);
      started_ok = false;
    } else {
      {
        SignalWatcher watcher{caf::actor_cast<caf::actor>(started->supervisor)};
        caf::scoped_actor self{sys};
        self->monitor(started->supervisor);
        bool down = false;
        self->receive_while([&] { return !down; })([&](caf::down_msg&) { down = true; });
        killed = watcher.killed();
      }
      if (killed) {
        // The supervisor was killed before it could report: its VM actors are
        // gone with it (they kill QEMU and remove their files as they stop).
        v1::JobEvent event;
        event.set_job_id(job.id());
        event.set_sequence(UINT64_MAX);
        event.set_timestamp_us(std::chrono::duration_cast<std::chrono::microseconds>(
                                 std::chrono::system_clock::now().time_since_epoch())
                                 .count());
        auto* result = event.mutable_result();
        result->set_job_id(job.id());
        result->set_status(v1::CANCELLED);
        result->set_exit_code(exit_cancelled);
        result->set_shutdown_method("kill");
        result->set_error("killed by a second interrupt");
        result->set_summary("job " + job.id() + " cancelled: killed by a second interrupt");
        caf::anon_send(started->recorder, event_atom::value, event);
        caf::anon_send(printer, event_atom::value, event);
      }
    }
  }
  pthread_sigmask(SIG_UNBLOCK, &signals, nullptr);
  if (!started_ok)
    return exit_infrastructure_error;
  if (result_future.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    std::fprintf(stderr, "solstice-runner: job %s ended without a result\n", job.id().c_str());
    return exit_infrastructure_error;
  }
  return exit_code_for(result_future.get());
}

}  // namespace solstice
