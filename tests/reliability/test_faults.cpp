// Faults the runner must survive: its QEMU killed, itself killed, SIGTERM, a guest
// that never brings SSH up, a QEMU that exits at once, a KVM that cannot run guests.
// Every case runs the real solstice-runner binary on the real test guest (TCG).
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <thread>
#include <vector>

#include "runtime/vm/recovery.hpp"
#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;
using steady = std::chrono::steady_clock;

namespace {

// Room for a TCG boot of the test guest on a loaded two-core host.
constexpr auto boot_allowance = 300s;
// The powerdown timeout of every configuration here.
constexpr unsigned powerdown_timeout = 20;

// A runner configuration with bounded boot and shutdown times.
fs::path write_config(const Sandbox& sandbox, unsigned boot_timeout = 240,
                      nlohmann::json images = nlohmann::json::array()) {
  nlohmann::json config = {{"boot_timeout_seconds", boot_timeout},
                           {"powerdown_timeout_seconds", powerdown_timeout}};
  if (!images.empty())
    config["images"] = images;
  return sandbox.write_json("runner-config.json", config);
}

// A configuration whose image QEMU cannot start: kernel boot of a file that is no
// kernel. QEMU exits at once with an error.
fs::path write_broken_kernel_config(const Sandbox& sandbox, unsigned boot_timeout = 120) {
  auto not_a_kernel = sandbox.write("not-a-kernel", std::string(4096, 'x'));
  return write_config(sandbox, boot_timeout,
                      nlohmann::json::array({{{"label", "broken-kernel"},
                                              {"boot_mode", "BOOT_MODE_KERNEL"},
                                              {"kernel", not_a_kernel.string()},
                                              {"memory_mib", 128}}}));
}

// A step that has started: the job is running in a booted guest.
bool step_started(const Sandbox& sandbox, const std::string& id) {
  return sandbox.step_output(id, 0).find("step-started") != std::string::npos;
}

// QEMU's PID from the owner record the runner keeps in the VM's work directory,
// checked against /proc: it must be a process whose command line names the work dir.
pid_t qemu_pid_of(const Sandbox& sandbox, const std::string& id) {
  auto record = solstice::read_owner_record(sandbox.work_dir(id));
  REQUIRE_MESSAGE(record, (record ? "" : record.error().message));
  REQUIRE(record->qemu_pid > 0);
  CHECK(record->job_id == id);
  std::ifstream cmdline("/proc/" + std::to_string(record->qemu_pid) + "/cmdline");
  std::string args((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
  REQUIRE_MESSAGE(args.find(sandbox.work_dir(id).string()) != std::string::npos,
                  "pid " << record->qemu_pid << " is not this job's QEMU");
  REQUIRE(args.find("qemu-system") != std::string::npos);
  return record->qemu_pid;
}

double seconds_since(steady::time_point start) {
  return std::chrono::duration<double>(steady::now() - start).count();
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// connect() to addr:port; true when the connection is accepted.
bool can_connect(const std::string& address, uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  REQUIRE(fd >= 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(port);
  REQUIRE(::inet_pton(AF_INET, address.c_str(), &to.sin_addr) == 1);
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&to), sizeof to) == 0;
  ::close(fd);
  return ok;
}

// IPv4 addresses of this host's interfaces other than loopback.
std::vector<std::string> non_loopback_addresses() {
  std::vector<std::string> found;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0)
    return found;
  for (auto* entry = list; entry; entry = entry->ifa_next) {
    if (!entry->ifa_addr || entry->ifa_addr->sa_family != AF_INET)
      continue;
    char text[INET_ADDRSTRLEN];
    auto* in = reinterpret_cast<sockaddr_in*>(entry->ifa_addr);
    ::inet_ntop(AF_INET, &in->sin_addr, text, sizeof text);
    if (std::string(text).rfind("127.", 0) != 0)
      found.push_back(text);
  }
  ::freeifaddrs(list);
  return found;
}

// Files under `dir` whose content contains `needle`.
std::vector<std::string> files_containing(const fs::path& dir, const std::string& needle) {
  std::vector<std::string> found;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file())
      continue;
    std::ifstream file(it->path(), std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (contains(text, needle))
      found.push_back(it->path().string());
  }
  return found;
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("QEMU killed mid-job: infrastructure_error at once, naming the signal, with console "
          "lines") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "qemu-killed";
  auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-started; sleep 600"}));
  auto runner = Runner::start(sandbox.run_args(job, "tcg", write_config(sandbox)));
  REQUIRE_MESSAGE(runner.wait_until([&] { return step_started(sandbox, id); }, boot_allowance),
                  runner.output());

  pid_t qemu = qemu_pid_of(sandbox, id);
  REQUIRE(::kill(qemu, SIGKILL) == 0);
  auto killed_at = steady::now();
  auto status = runner.wait(30s);
  auto took = seconds_since(killed_at);
  REQUIRE_MESSAGE(status, runner.output());
  INFO("the runner ended " << took << " s after QEMU was killed");
  CHECK(took < 5.0);
  CHECK(status->code == 125);

  auto result = sandbox.result(id);
  REQUIRE_MESSAGE(result, runner.output());
  CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
  INFO("error: " << result->error());
  CHECK(contains(result->error(), "QEMU exited unexpectedly"));
  CHECK((contains(result->error(), "signal 9") || contains(result->error(), "KILL")));
  // The last console lines of the boot come with the error.
  CHECK(result->console_tail_size() > 0);
  CHECK(contains(result->error(), "last console lines"));
  check_nothing_left(sandbox);
}

TEST_CASE("runner killed mid-job: its QEMU dies with it, the next run cleans up and records "
          "the job") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "runner-killed";
  auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-started; sleep 600"}));
  auto runner = Runner::start(sandbox.run_args(job, "tcg", write_config(sandbox)));
  REQUIRE_MESSAGE(runner.wait_until([&] { return step_started(sandbox, id); }, boot_allowance),
                  runner.output());

  pid_t qemu = qemu_pid_of(sandbox, id);
  runner.signal(SIGKILL);
  auto killed_at = steady::now();
  REQUIRE(runner.wait(10s));
  while (!process_gone(qemu) && seconds_since(killed_at) < 10)
    std::this_thread::sleep_for(20ms);
  auto took = seconds_since(killed_at);
  INFO("QEMU was gone " << took << " s after the runner was killed");
  CHECK(process_gone(qemu));
  CHECK(took < 2.0);

  // What the dead runner left: its VM work directory, a job without result.
  REQUIRE(fs::exists(sandbox.work_dir(id) / solstice::owner_record_file));
  CHECK_FALSE(sandbox.result(id));

  // The next run (of a job that fails fast: its QEMU cannot start) cleans up first.
  auto next_job = sandbox.write_json("next.json", {{"id", "next-job"},
                                                   {"runs_on", "broken-kernel"},
                                                   {"steps", {{{"script", "true"}}}}});
  auto next = run_to_end(sandbox.run_args(next_job, "tcg", write_broken_kernel_config(sandbox)),
                         120s);
  REQUIRE_MESSAGE(next.exited(), next.output());
  INFO(next.output());
  CHECK(contains(next.err(), "job " + id + " was left by a runner that stopped"));
  CHECK(contains(next.err(), "recorded it as infrastructure_error"));
  CHECK_FALSE(fs::exists(sandbox.work_dir(id)));

  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(result->error() == solstice::abandoned_job_error);
  auto events = sandbox.events(id);
  REQUIRE_FALSE(events.empty());
  CHECK(events.back().has_result());
  check_nothing_left(sandbox);
}

TEST_CASE("SIGTERM mid-step: VM powered down, job cancelled, exit 130; the forward is on "
          "127.0.0.1 only; private directories; no key left") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "terminated";
  auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-started; sleep 600",
                                                           "echo never"}));
  auto runner = Runner::start(sandbox.run_args(job, "tcg", write_config(sandbox)));
  REQUIRE_MESSAGE(runner.wait_until([&] { return step_started(sandbox, id); }, boot_allowance),
                  runner.output());

  {
    INFO("the SSH forward binds 127.0.0.1 only");
    auto detail = sandbox.state_detail(id, v1::WAITING_FOR_SSH);
    REQUIRE(detail);
    REQUIRE(detail->rfind("127.0.0.1:", 0) == 0);
    auto port = static_cast<uint16_t>(std::stoi(detail->substr(10)));
    REQUIRE(port > 0);
    CHECK(can_connect("127.0.0.1", port));
    CHECK_FALSE(can_connect("127.0.0.2", port));
    for (const auto& address : non_loopback_addresses()) {
      INFO("address " << address);
      CHECK_FALSE(can_connect(address, port));
    }
  }
  {
    INFO("state, job and VM directories are private");
    // As root QEMU runs as qemu_user: it may search (not list) the state directory
    // and run/, and shares its own VM's work directory with the runner (sticky).
    // The runner made the state directory (a parent of jobs/ and run/): search only
    // for others, whoever runs it.
    const bool root = ::geteuid() == 0;
    CHECK(mode_of(sandbox.state()) == 0701);
    CHECK(mode_of(sandbox.state() / "jobs") == 0700);
    CHECK(mode_of(sandbox.state() / "run") == (root ? 0701 : 0700));
    CHECK(mode_of(sandbox.job_dir(id)) == 0700);
    CHECK(mode_of(sandbox.work_dir(id)) == (root ? 01770 : 0700));
    CHECK(mode_of(sandbox.work_dir(id) / solstice::owner_record_file) == 0600);
    CHECK(mode_of(sandbox.job_dir(id) / "events.jsonl") == 0600);
    CHECK(mode_of(sandbox.job_dir(id) / "console.log") == 0600);
  }

  pid_t qemu = qemu_pid_of(sandbox, id);
  runner.signal(SIGTERM);
  auto signalled_at = steady::now();
  // Shutdown timeout: 20 s of powerdown, then quit and kill, which are quick.
  auto status = runner.wait(60s);
  auto took = seconds_since(signalled_at);
  REQUIRE_MESSAGE(status, runner.output());
  INFO("exited " << took << " s after SIGTERM\n" << runner.output());
  CHECK(took < 35.0);
  CHECK(status->code == 130);
  CHECK(contains(runner.err(), "cancelling the job"));
  CHECK(process_gone(qemu));

  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::CANCELLED);
  INFO("shutdown method: " << result->shutdown_method());
  CHECK((result->shutdown_method() == "powerdown" || result->shutdown_method() == "quit"));
  REQUIRE(result->steps_size() == 2);
  CHECK(result->steps(0).outcome() == v1::STEP_CANCELLED);
  CHECK(result->steps(1).outcome() == v1::STEP_SKIPPED);

  // The job's private key lived in memory only; the seed (which carried the
  // guest's host key) went with the VM's work directory.
  CHECK(files_containing(sandbox.state(), "PRIVATE KEY").empty());
  CHECK(files_containing(sandbox.root(), "PRIVATE KEY").empty());
  check_nothing_left(sandbox);
}

TEST_CASE("a guest that never brings SSH up fails at the boot timeout, saying so") {
  Sandbox sandbox;
  const std::string id = "no-ssh";
  // A boot sector that loops for ever (jmp $; the boot signature, without which
  // the image is refused as not bootable): the guest boots into nothing.
  std::string sector = "\xeb\xfe" + std::string(508, '\0') + "\x55\xaa";
  auto disk = sandbox.write("hang.raw", sector + std::string((1 << 20) - 512, '\0'));
  auto job = sandbox.write_json("job.json", {{"id", id},
                                             {"image", disk.string()},
                                             {"steps", {{{"script", "true"}}}}});
  const unsigned boot_timeout = 15;
  auto started = steady::now();
  auto runner = run_to_end(sandbox.run_args(job, "tcg", write_config(sandbox, boot_timeout)),
                           120s);
  auto took = seconds_since(started);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  CHECK(runner.wait(0ms)->code == 125);
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(contains(result->error(), "SSH did not become ready"));

  // Decided at the boot timeout: measured from the wait for SSH to the error event.
  // (The shutdown after it may then take up to the powerdown timeout: a guest that
  // never booted does not answer the power button.)
  auto events = sandbox.events(id);
  int64_t waiting_us = 0, error_us = 0;
  for (const auto& event : events) {
    if (event.has_state() && event.state().state() == v1::WAITING_FOR_SSH)
      waiting_us = event.timestamp_us();
    if (event.has_error() && error_us == 0)
      error_us = event.timestamp_us();
  }
  REQUIRE(waiting_us > 0);
  REQUIRE(error_us > 0);
  double waited = static_cast<double>(error_us - waiting_us) / 1e6;
  INFO("waited " << waited << " s for SSH, " << took << " s in all");
  CHECK(waited >= boot_timeout - 1.0);
  CHECK(waited < boot_timeout + 10.0);
  CHECK(took < boot_timeout + powerdown_timeout + 20.0);
  check_nothing_left(sandbox);
}

TEST_CASE("QEMU that exits at once fails the job at once, not at the boot timeout") {
  Sandbox sandbox;
  const std::string id = "qemu-exits";
  const unsigned boot_timeout = 120;

  SUBCASE("a kernel boot of a file that is no kernel") {
    auto job = sandbox.write_json("job.json", {{"id", id},
                                               {"runs_on", "broken-kernel"},
                                               {"steps", {{{"script", "true"}}}}});
    auto started = steady::now();
    auto runner = run_to_end(
      sandbox.run_args(job, "tcg", write_broken_kernel_config(sandbox, boot_timeout)), 60s);
    auto took = seconds_since(started);
    REQUIRE_MESSAGE(runner.exited(), runner.output());
    INFO(runner.output() << "\ntook " << took << " s");
    CHECK(took < 20.0);
    CHECK(runner.wait(0ms)->code == 125);
    auto result = sandbox.result(id);
    REQUIRE(result);
    CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
    INFO("error: " << result->error());
    // The cause: QEMU's exit and its own complaint.
    CHECK(contains(result->error(), "exit code 1"));
    CHECK(contains(result->error(), "invalid kernel header"));
  }
  SUBCASE("a disk image QEMU refuses (qcow2 header, garbage after it)") {
    std::string bogus = "QFI\xfb";
    bogus += std::string(4092, '\x7f');
    auto disk = sandbox.write("bogus.qcow2", bogus);
    auto job = sandbox.write_json("job.json", {{"id", id},
                                               {"image", disk.string()},
                                               {"steps", {{{"script", "true"}}}}});
    auto started = steady::now();
    auto runner =
      run_to_end(sandbox.run_args(job, "tcg", write_config(sandbox, boot_timeout)), 60s);
    auto took = seconds_since(started);
    REQUIRE_MESSAGE(runner.exited(), runner.output());
    INFO(runner.output() << "\ntook " << took << " s");
    CHECK(took < 20.0);
    auto code = runner.wait(0ms)->code;
    // Refused before any VM starts (invalid input) or as soon as QEMU tries it.
    CHECK((code == 2 || code == 125));
    if (code == 125) {
      auto result = sandbox.result(id);
      REQUIRE(result);
      CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
      CHECK(contains(result->error(), disk.string()));
    } else {
      CHECK(contains(runner.err(), disk.string()));
    }
  }
  check_nothing_left(sandbox);
}

TEST_CASE("accelerators: auto falls back to TCG with a notice; explicit kvm fails clearly") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  if (!fs::exists("/dev/kvm") || ::access("/dev/kvm", R_OK | W_OK) != 0) {
    MESSAGE("no usable /dev/kvm here: nothing to fall back from");
    return;
  }
  Sandbox sandbox;
  SUBCASE("explicit kvm") {
    const std::string id = "kvm-explicit";
    const unsigned boot_timeout = 30;
    auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-started"}));
    auto started = steady::now();
    auto runner =
      run_to_end(sandbox.run_args(job, "kvm", write_config(sandbox, boot_timeout)), 120s);
    auto took = seconds_since(started);
    REQUIRE_MESSAGE(runner.exited(), runner.output());
    INFO(runner.output() << "\ntook " << took << " s");
    auto code = runner.wait(0ms)->code;
    if (code == 0) {
      MESSAGE("KVM can run guests on this host: explicit kvm succeeded");
    } else {
      CHECK(code == 125);
      CHECK(took < boot_timeout + 30.0);
      auto result = sandbox.result(id);
      REQUIRE(result);
      CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
      INFO("error: " << result->error());
      // Says why: KVM named, and no silent fallback for an explicit choice.
      CHECK(contains(result->error(), "KVM"));
      // Noticed within seconds (QEMU stops a guest KVM cannot run), not at the
      // boot timeout.
      auto events = sandbox.events(id);
      REQUIRE_FALSE(events.empty());
      int64_t error_us = 0;
      for (const auto& event : events)
        if (event.has_error() && error_us == 0)
          error_us = event.timestamp_us();
      REQUIRE(error_us > 0);
      double decided = static_cast<double>(error_us - events.front().timestamp_us()) / 1e6;
      INFO("decided after " << decided << " s");
      CHECK(decided < 15.0);
      for (const auto& notice : sandbox.notices(id))
        CHECK_FALSE(contains(notice, "falling back to TCG"));
    }
  }
  SUBCASE("auto") {
    const std::string id = "kvm-auto";
    auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-started"}));
    auto runner =
      run_to_end(sandbox.run_args(job, "auto", write_config(sandbox)), boot_allowance + 60s);
    REQUIRE_MESSAGE(runner.exited(), runner.output());
    INFO(runner.output());
    CHECK(runner.wait(0ms)->code == 0);
    auto result = sandbox.result(id);
    REQUIRE(result);
    CHECK(result->status() == v1::SUCCEEDED);
    CHECK(step_started(sandbox, id));
    bool fell_back = false;
    for (const auto& notice : sandbox.notices(id))
      fell_back |= contains(notice, "falling back to TCG");
    auto booting = sandbox.state_detail(id, v1::BOOTING);
    // Either KVM works here, or the fallback was announced.
    if (!fell_back)
      CHECK((booting && contains(*booting, "kvm")));
    else
      CHECK(contains(runner.out() + runner.err(), "falling back to TCG"));
    // Each phase is listed once; after a fallback the KVM attempt's own are
    // named as such, before the TCG attempt's.
    std::vector<std::string> phases;
    std::string listed;
    for (const auto& phase : result->phases()) {
      phases.push_back(phase.phase());
      listed += phase.phase() + " ";
    }
    INFO("phases: " << listed);
    CHECK(std::count(phases.begin(), phases.end(), "prepare") == 1);
    CHECK(std::count(phases.begin(), phases.end(), "boot_to_ssh") == 1);
    if (fell_back) {
      REQUIRE(phases.size() >= 4);
      CHECK(phases[0] == "kvm:prepare");
      CHECK(phases[1] == "kvm:boot");
      CHECK(phases[2] == "prepare");
    }
  }
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
