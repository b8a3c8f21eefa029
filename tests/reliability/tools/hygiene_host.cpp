// A long-lived host process for the reliability suite: runs jobs one after another
// on the test guest through the embedding API (one actor system for all of them)
// and reports what the process holds — open fds, threads, RSS — after warm-up
// jobs and again after the last job, so a test can assert that nothing grows.
//
//   solstice-hygiene-host TEST_GUEST_DIR STATE_DIR JOBS [disk|kernel] [WARMUP_JOBS]
//
// Warm-up jobs (default 3) come first: glibc gives new threads their own malloc
// arenas, and the arenas a job's threads touch stay in RSS for reuse, so RSS
// climbs over the first few jobs and then levels off (with MALLOC_ARENA_MAX=1 it
// stays flat from the first job on).
//
// Prints one line per job ("job ID STATUS SECONDS") followed by a measurement
// line ("  now fds=N threads=N rss_kib=N heap_kib=N"); the one after the warm-up
// is labelled "baseline", the one after the last job "after".
// Exit code 0 when every job succeeded, 1 when one did not, 2 on bad usage.
#include <dirent.h>
#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include "actors/host/embedding.hpp"
#include "runtime/job/runner_config.hpp"

namespace {

using namespace std::chrono_literals;

// Entries of a /proc/self directory, not counting "." and "..".
long count_entries(const char* path) {
  DIR* dir = ::opendir(path);
  if (!dir)
    return -1;
  long count = 0;
  while (auto* entry = ::readdir(dir))
    if (entry->d_name[0] != '.')
      ++count;
  ::closedir(dir);
  return count;
}

long rss_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0)
      return std::strtol(line.c_str() + 6, nullptr, 10);
  return -1;
}

struct Usage {
  long fds = 0;  // without the one opendir holds while counting
  long threads = 0;
  long rss_kib = 0;
  // Bytes the allocator has handed out and not got back: tells a leak (this
  // grows) from memory the allocator keeps for reuse (only RSS grows).
  long heap_kib = 0;
};

Usage measure() {
  return {count_entries("/proc/self/fd") - 1, count_entries("/proc/self/task"), rss_kib(),
          static_cast<long>(mallinfo2().uordblks / 1024)};
}

void print(const char* label, const Usage& usage) {
  std::printf("%s fds=%ld threads=%ld rss_kib=%ld heap_kib=%ld\n", label, usage.fds,
              usage.threads, usage.rss_kib, usage.heap_kib);
  std::fflush(stdout);
}

struct sink_state {
  std::shared_ptr<solstice::v1::JobResult> result;
};

// The host's event sink: keeps the result; quits after it.
solstice::event_sink_actor::behavior_type
result_sink(solstice::event_sink_actor::stateful_pointer<sink_state> self,
            std::shared_ptr<solstice::v1::JobResult> result) {
  self->state.result = std::move(result);
  return {
    [=](solstice::event_atom, const solstice::v1::JobEvent& event) {
      if (event.has_result()) {
        *self->state.result = event.result();
        self->quit();
      }
    },
  };
}

struct host_config : caf::actor_system_config {
  host_config() { solstice::add_runner_types(*this); }
};

// Runs one job and waits until its supervisor, its recorder and the sink have all
// ended (the supervisor ends only after the VM is cleaned up). False when the job
// did not succeed or did not end within `timeout`.
bool run_job(caf::actor_system& sys, const solstice::v1::RunnerConfig& config,
             const std::string& id, std::chrono::seconds timeout) {
  solstice::v1::JobSpec job;
  job.set_id(id);
  job.set_name("hygiene " + id);
  job.set_runs_on(solstice::test_guest_label);
  job.set_timeout_seconds(static_cast<uint32_t>(timeout.count()));
  auto* step = job.add_steps();
  step->set_name("output");
  // Some output on both streams, so the output path is part of every job.
  step->set_script("echo \"" + id + " on $(hostname)\"\nyes " + id +
                   " | head -c 262144\necho \"" + id + " to stderr\" >&2\n");

  auto started_at = std::chrono::steady_clock::now();
  auto result = std::make_shared<solstice::v1::JobResult>();
  auto sink = sys.spawn(result_sink, result);
  auto started = solstice::start_job(sys, job, config, sink);
  if (!started) {
    std::printf("job %s NOT_STARTED %s\n", id.c_str(), started.error().message.c_str());
    caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
    return false;
  }
  size_t running = 0;
  {
    caf::scoped_actor self{sys};
    for (const caf::actor_addr& actor :
         {sink.address(), started->supervisor.address(), started->recorder.address()}) {
      self->monitor(actor);
      ++running;
    }
    auto deadline = std::chrono::steady_clock::now() + timeout + 60s;
    bool timed_out = false;
    while (running > 0 && !timed_out) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
      self->receive([&](caf::down_msg&) { --running; },
                    caf::after(std::max(left, std::chrono::milliseconds(1))) >>
                      [&] { timed_out = true; });
    }
  }
  double seconds =
    std::chrono::duration<double>(std::chrono::steady_clock::now() - started_at).count();
  if (running > 0) {
    std::printf("job %s HANG %.1f\n", id.c_str(), seconds);
    std::fflush(stdout);
    caf::anon_send(started->supervisor, solstice::cancel_atom::value);
    return false;
  }
  auto status = solstice::v1::JobStatus_Name(result->status());
  std::printf("job %s %s %.1f%s%s\n", id.c_str(), status.c_str(), seconds,
              result->error().empty() ? "" : " ", result->error().c_str());
  std::fflush(stdout);
  return result->status() == solstice::v1::SUCCEEDED;
}

// Threads of ended detached actors and closed fds may take a moment to go.
// The baseline: wait (bounded) until fds and threads have stayed the same for a
// second, so a thread still on its way out is not counted.
Usage quiet() {
  Usage last = measure();
  int unchanged = 0;
  for (int i = 0; i < 150 && unchanged < 10; ++i) {
    std::this_thread::sleep_for(100ms);
    Usage now = measure();
    unchanged = now.fds == last.fds && now.threads == last.threads ? unchanged + 1 : 0;
    last = now;
  }
  return last;
}

// Later: wait (bounded) until the counts are back at the baseline, so only what
// stays — a leak — shows.
Usage settled(const Usage& baseline) {
  Usage now = measure();
  for (int i = 0; i < 150 && (now.fds > baseline.fds || now.threads > baseline.threads); ++i) {
    std::this_thread::sleep_for(100ms);
    now = measure();
  }
  return now;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 6) {
    std::fprintf(stderr, "usage: %s TEST_GUEST_DIR STATE_DIR JOBS [disk|kernel] [WARMUP_JOBS]\n",
                 argv[0]);
    return 2;
  }
  // A host that runs job after job, set up as embedding.hpp advises and as the
  // solstice-runner process is.
  solstice::limit_malloc_arenas();
  const int jobs = std::atoi(argv[3]);
  const std::string boot = argc >= 5 ? argv[4] : "disk";
  const int warmup_jobs = argc >= 6 ? std::atoi(argv[5]) : 3;
  if (jobs < 1 || warmup_jobs < 1 || (boot != "disk" && boot != "kernel")) {
    std::fprintf(stderr,
                 "%s: JOBS and WARMUP_JOBS must be at least 1, the boot mode disk or kernel\n",
                 argv[0]);
    return 2;
  }

  auto config = solstice::default_runner_config();
  config.set_state_dir(argv[2]);
  config.set_accel("tcg");
  auto guest = solstice::load_test_guest_image(argv[1]);
  if (!guest) {
    std::fprintf(stderr, "%s: %s\n", argv[0], guest.error().message.c_str());
    return 2;
  }
  if (boot == "kernel")
    guest->set_boot_mode(solstice::v1::BOOT_MODE_KERNEL);
  *config.add_images() = *guest;

  host_config cfg;
  caf::actor_system sys{cfg};
  constexpr auto job_timeout = std::chrono::seconds(600);

  bool all_succeeded = true;
  for (int i = 1; i <= warmup_jobs && all_succeeded; ++i)
    all_succeeded = run_job(sys, config, "hygiene-warmup-" + std::to_string(i), job_timeout);
  auto baseline = quiet();
  print("baseline", baseline);
  for (int i = 1; i <= jobs && all_succeeded; ++i) {
    all_succeeded = run_job(sys, config, "hygiene-" + std::to_string(i), job_timeout);
    // The trend, for whoever reads the log: a leak grows with every job.
    print("  now", settled(baseline));
  }
  print("after", settled(baseline));
  return all_succeeded ? 0 : 1;
}
