// Chaos on real QEMU: jobs one after another on one state directory, each hit by one
// fault at a seeded random moment of its life — QEMU SIGKILLed, the QMP connection
// closed while QEMU runs, the guest's sshd killed, SIGTERM to the runner. Each job
// must end with a result naming the cause within 5 s of the fault and leave no
// process, no VM files and no VM slot behind.
//
// SOLSTICE_CHAOS_JOBS sets the number of jobs (10); SOLSTICE_CHAOS_SEED replays a run.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iterator>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "runtime/vm/recovery.hpp"
#include "tests/reliability/harness.hpp"
#include "tests/reliability/qemu_wrappers.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;
using steady = std::chrono::steady_clock;
using wall = std::chrono::system_clock;

namespace {

enum class Fault { kill_qemu, close_qmp, kill_sshd, term_runner };
constexpr Fault all_faults[] = {Fault::kill_qemu, Fault::close_qmp, Fault::kill_sshd,
                                Fault::term_runner};

const char* name_of(Fault fault) {
  switch (fault) {
    case Fault::kill_qemu: return "QEMU SIGKILLed";
    case Fault::close_qmp: return "QMP connection closed";
    case Fault::kill_sshd: return "guest sshd killed";
    case Fault::term_runner: return "runner SIGTERMed";
  }
  return "?";
}

// From each fault to the job's result.
constexpr double result_within_seconds = 5.0;
// Host-side faults come this long (at most) after the job's first event: through
// preparation, boot and into the step (a TCG boot takes 5-10 s here).
constexpr double latest_fault_seconds = 12.0;
// The guest kills its sshd this long (at most) after the step started.
constexpr double latest_sshd_kill_seconds = 3.0;
constexpr auto boot_allowance = 300s;

// splitmix64: the same sequence from a seed with every compiler and library.
struct Rng {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform(double low, double high) {
    return low + (high - low) * static_cast<double>(next() >> 11) * 0x1.0p-53;
  }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
};

uint64_t env_number(const char* name, uint64_t fallback) {
  const char* text = std::getenv(name);
  return text && *text ? std::strtoull(text, nullptr, 10) : fallback;
}

double wall_seconds() {
  return std::chrono::duration<double>(wall::now().time_since_epoch()).count();
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

// An error's first line, shortened: one summary line per job.
std::string first_line(const std::string& text) {
  auto line = text.substr(0, text.find('\n'));
  return line.size() > 120 ? line.substr(0, 120) + "…" : line;
}

std::string cmdline_of(pid_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/cmdline");
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// The job's QEMU from the owner record in its work directory, once it runs: a live
// process whose command line is QEMU's and names the work directory.
std::optional<pid_t> qemu_pid(const Sandbox& sandbox, const std::string& id) {
  auto record = solstice::read_owner_record(sandbox.work_dir(id));
  if (!record || record->qemu_pid <= 0 || process_gone(record->qemu_pid))
    return std::nullopt;
  auto args = cmdline_of(record->qemu_pid);
  if (args.rfind("qemu-system", 0) != 0 || !contains(args, sandbox.work_dir(id).string()))
    return std::nullopt;
  return record->qemu_pid;
}

// The step has printed its marker: the job runs in a booted guest.
std::optional<int64_t> step_started_us(const Sandbox& sandbox, const std::string& id) {
  for (const auto& event : sandbox.events(id))
    if (event.has_output() && contains(event.output().data(), "step-started"))
      return event.timestamp_us();
  return std::nullopt;
}

std::optional<int64_t> result_event_us(const Sandbox& sandbox, const std::string& id) {
  for (const auto& event : sandbox.events(id))
    if (event.has_result())
      return event.timestamp_us();
  return std::nullopt;
}

// Slot lock files (state/slots/N.lock) that some process still holds.
std::vector<std::string> held_slots(const Sandbox& sandbox) {
  std::vector<std::string> held;
  std::error_code ec;
  for (fs::directory_iterator it(sandbox.state() / "slots", ec), end; !ec && it != end;
       it.increment(ec)) {
    int fd = ::open(it->path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      continue;
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0)
      held.push_back(it->path().filename().string());
    else
      ::flock(fd, LOCK_UN);
    ::close(fd);
  }
  return held;
}

// After a failed job: SIGKILL what still names the sandbox, checked by command line,
// so that the next job starts clean.
void kill_leftovers(const Sandbox& sandbox) {
  for (pid_t pid : sandbox.processes())
    if (contains(cmdline_of(pid), sandbox.root().string()))
      ::kill(pid, SIGKILL);
  for (int i = 0; i < 50 && !sandbox.processes().empty(); ++i)
    std::this_thread::sleep_for(100ms);
}

// How the result must name each fault.
void check_cause(Fault fault, int code, const v1::JobResult& result, const std::string& err) {
  const auto& error = result.error();
  switch (fault) {
    case Fault::kill_qemu:
      CHECK(code == 125);
      CHECK(result.status() == v1::INFRASTRUCTURE_ERROR);
      CHECK(contains(error, "QEMU"));
      CHECK((contains(error, "signal 9") || contains(error, "KILL")));
      break;
    case Fault::close_qmp:
      CHECK(code == 125);
      CHECK(result.status() == v1::INFRASTRUCTURE_ERROR);
      CHECK(contains(error, "QMP"));
      break;
    case Fault::kill_sshd:
      CHECK(code == 125);
      CHECK(result.status() == v1::INFRASTRUCTURE_ERROR);
      CHECK(contains(lower(error), "ssh"));
      break;
    case Fault::term_runner:
      CHECK(code == 130);
      CHECK(result.status() == v1::CANCELLED);
      CHECK(contains(err, "cancel"));
      break;
  }
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("chaos: jobs hit by a fault at a random moment end with a result naming the cause "
          "within 5 s and leave nothing behind") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  const auto jobs = static_cast<size_t>(env_number("SOLSTICE_CHAOS_JOBS", 10));
  const uint64_t seed = env_number("SOLSTICE_CHAOS_SEED", std::random_device{}());
  MESSAGE("chaos: " << jobs << " jobs, seed " << seed << " (SOLSTICE_CHAOS_SEED=" << seed
                    << " replays this run)");
  INFO("seed " << seed);
  Rng rng{seed};

  // Every fault comes up (from four jobs on), in a random order.
  std::vector<Fault> plan;
  for (size_t i = 0; i < jobs; ++i)
    plan.push_back(all_faults[i % std::size(all_faults)]);
  for (size_t i = plan.size(); i > 1; --i)
    std::swap(plan[i - 1], plan[rng.below(i)]);

  Sandbox sandbox;
  // One VM at a time: a slot a job left held would make the next one wait in the queue.
  auto plain = write_runner_config(sandbox, {{"max_concurrent_vms", 1}}, "plain.json");
  auto proxied = write_runner_config(
    sandbox, {{"max_concurrent_vms", 1}, {"qemu_binary", write_qmp_proxy_wrapper(sandbox).string()}},
    "proxied.json");

  std::map<std::string, int> ran;
  size_t passed = 0;
  for (size_t i = 0; i < jobs; ++i) {
    const Fault fault = plan[i];
    const std::string id = "chaos-" + std::to_string(i);
    const double delay = fault == Fault::kill_sshd ? rng.uniform(0.0, latest_sshd_kill_seconds)
                                                   : rng.uniform(0.0, latest_fault_seconds);
    std::ostringstream delay_text;
    delay_text << std::fixed << std::setprecision(2) << delay;
    std::string script = "echo step-started; sleep 600";
    if (fault == Fault::kill_sshd)
      script = "echo step-started; (sleep " + delay_text.str() +
               "; kill $(pidof dropbear)) & sleep 600";
    auto job = sandbox.write_json(id + ".json", guest_job(id, {script}));
    INFO("job " << i << " (" << id << "): " << std::string(name_of(fault)) << " at +"
                << delay_text.str() << " s");

    auto runner =
      Runner::start(sandbox.run_args(job, "tcg", fault == Fault::close_qmp ? proxied : plain));
    REQUIRE_MESSAGE(
      runner.wait_until([&] { return !sandbox.events(id).empty(); }, 60s), runner.output());
    const auto job_seen = steady::now();
    auto wait_delay = [&] {
      auto until = job_seen + std::chrono::duration_cast<steady::duration>(
                                std::chrono::duration<double>(delay));
      while (steady::now() < until && !runner.exited())
        runner.pump(std::chrono::duration_cast<std::chrono::milliseconds>(until - steady::now()));
    };

    double fault_at = 0;  // wall clock, seconds
    bool in_step = false;
    switch (fault) {
      case Fault::term_runner:
        wait_delay();
        REQUIRE_MESSAGE(!runner.exited(), runner.output());
        in_step = step_started_us(sandbox, id).has_value();
        runner.signal(SIGTERM);
        fault_at = wall_seconds();
        break;
      case Fault::kill_qemu: {
        wait_delay();
        std::optional<pid_t> qemu;
        REQUIRE_MESSAGE(runner.wait_until([&] { return (qemu = qemu_pid(sandbox, id)).has_value(); },
                                          boot_allowance),
                        runner.output());
        in_step = step_started_us(sandbox, id).has_value();
        REQUIRE(::kill(*qemu, SIGKILL) == 0);
        fault_at = wall_seconds();
        break;
      }
      case Fault::close_qmp: {
        wait_delay();
        std::optional<pid_t> proxy;
        REQUIRE_MESSAGE(
          runner.wait_until([&] { return (proxy = qmp_proxy_pid(sandbox, id)).has_value(); },
                            boot_allowance),
          runner.output());
        in_step = step_started_us(sandbox, id).has_value();
        REQUIRE(::kill(*proxy, SIGKILL) == 0);
        fault_at = wall_seconds();
        break;
      }
      case Fault::kill_sshd: {
        REQUIRE_MESSAGE(
          runner.wait_until([&] { return step_started_us(sandbox, id).has_value(); },
                            boot_allowance),
          runner.output());
        // The guest kills its sshd `delay` after it printed the marker.
        in_step = true;
        fault_at = static_cast<double>(*step_started_us(sandbox, id)) / 1e6 + delay;
        break;
      }
    }

    // The power-down timeout (20 s) and a margin: enough to see a slow end as slow.
    auto status = runner.wait(45s);
    const double exited_at = wall_seconds();
    if (!status) {
      runner.signal(SIGKILL);
      runner.wait(10s);
    }
    auto result = sandbox.result(id);
    auto result_us = result_event_us(sandbox, id);
    const double ended_at = result_us ? static_cast<double>(*result_us) / 1e6 : exited_at;
    const double took = ended_at - fault_at;
    std::ostringstream summary;
    summary << "job " << i << ": " << name_of(fault) << " at +" << delay_text.str() << " s ("
            << (in_step ? "during the step" : "before the step") << "): "
            << describe(status) << ", "
            << (result ? v1::JobStatus_Name(result->status()) + " \"" + first_line(result->error()) +
                           "\""
                       : std::string("no result"))
            << ", " << std::fixed << std::setprecision(2) << took << " s after the fault";
    MESSAGE(summary.str());
    INFO(summary.str() << "\n" << runner.output());

    CHECK_MESSAGE(status.has_value(), "the runner did not end within 45 s of the fault");
    CHECK_MESSAGE(result_us.has_value(), "no result event");
    const bool in_time = took < result_within_seconds;
    CHECK(in_time);
    if (status && result)
      check_cause(fault, status->code, *result, runner.err());
    else
      CHECK_MESSAGE(result.has_value(), "no result.json");
    CHECK_FALSE(contains(runner.out() + runner.err(), "waiting in the queue"));
    check_nothing_left(sandbox);
    const bool clean = sandbox.processes().empty() && sandbox.run_entries().empty();
    auto held = held_slots(sandbox);
    CHECK_MESSAGE(held.empty(), "slot held: " << (held.empty() ? "" : held.front()));
    if (!status || !sandbox.processes().empty())
      kill_leftovers(sandbox);
    ++ran[name_of(fault)];
    if (status && result && in_time && clean && held.empty())
      ++passed;
  }

  std::ostringstream counts;
  for (const auto& [name, count] : ran)
    counts << "\n  " << name << ": " << count;
  MESSAGE("chaos: " << jobs << " jobs ran (seed " << seed << "), " << passed
                    << " ended in time and clean; faults:" << counts.str());
}

}  // TEST_SUITE
