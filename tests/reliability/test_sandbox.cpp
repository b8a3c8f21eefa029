// QEMU sandboxed and unprivileged: the QEMU of a running job (real runner binary, real
// test guest, TCG) has its seccomp filter on and, when the runner is root, runs as
// qemu_user with only its own VM's files; qemu_user "" keeps the runner's user; a
// missing user fails the job clearly with nothing left.
#include <doctest/doctest.h>

#include <pwd.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "runtime/vm/recovery.hpp"
#include "tests/reliability/harness.hpp"
#include "tests/reliability/qemu_wrappers.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

constexpr auto boot_allowance = 300s;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string read_text(const fs::path& path) {
  std::ifstream file(path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// QEMU's PID from the job's owner record, checked against /proc: its command line
// must name this sandbox's work directory of the job (never found by name).
pid_t qemu_pid_of(const Sandbox& sandbox, const std::string& id) {
  auto record = solstice::read_owner_record(sandbox.work_dir(id));
  REQUIRE_MESSAGE(record, (record ? "" : record.error().message));
  REQUIRE(record->qemu_pid > 0);
  auto args = read_text("/proc/" + std::to_string(record->qemu_pid) + "/cmdline");
  REQUIRE_MESSAGE(contains(args, sandbox.work_dir(id).string()),
                  "pid " << record->qemu_pid << " is not this job's QEMU");
  return record->qemu_pid;
}

// The values of a "Name:\tv1\tv2..." line of /proc/PID/status.
std::vector<std::string> status_field(const std::string& status, const std::string& name) {
  std::istringstream lines(status);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind(name + ":", 0) != 0) continue;
    std::istringstream values(line.substr(name.size() + 1));
    std::vector<std::string> found;
    for (std::string value; values >> value;) found.push_back(value);
    return found;
  }
  return {};
}

// Runs a job to its first step, hands the running QEMU's /proc status and the
// sandbox to `check`, then ends the job with SIGTERM (cancelled, exit 130).
template <class Check>
void with_running_qemu(const std::string& id, const nlohmann::json& config_extra, Check check) {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  auto job = sandbox.write_json("job.json", guest_job(id, {"echo step-started; sleep 600"}));
  auto config = write_runner_config(sandbox, config_extra);
  auto runner = Runner::start(sandbox.run_args(job, "tcg", config));
  REQUIRE_MESSAGE(runner.wait_until([&] { return contains(sandbox.step_output(id, 0), "step-started"); },
                                    boot_allowance),
                  runner.output());
  pid_t qemu = qemu_pid_of(sandbox, id);
  check(read_text("/proc/" + std::to_string(qemu) + "/status"), sandbox);
  runner.signal(SIGTERM);
  auto status = runner.wait(60s);
  REQUIRE_MESSAGE(status, runner.output());
  CHECK(status->code == 130);
  check_nothing_left(sandbox);
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("sandbox: a running job's QEMU has seccomp on and, as root, runs as solstice-qemu "
          "with only its own VM's files") {
  with_running_qemu("sandboxed", nlohmann::json::object(), [](const std::string& status,
                                                              const Sandbox& sandbox) {
    INFO(status);
    CHECK(status_field(status, "Seccomp") == std::vector<std::string>{"2"});
    if (::geteuid() != 0) return;  // a non-root runner has no other user to switch to
    const passwd* user = ::getpwnam("solstice-qemu");
    REQUIRE_MESSAGE(user, "user solstice-qemu is missing: run deploy/install-deps.sh");
    const std::string uid = std::to_string(user->pw_uid), gid = std::to_string(user->pw_gid);
    CHECK(uid != "0");
    // Real, effective, saved and file-system ids alike: nothing to go back to.
    CHECK(status_field(status, "Uid") == std::vector<std::string>{uid, uid, uid, uid});
    CHECK(status_field(status, "Gid") == std::vector<std::string>{gid, gid, gid, gid});
    for (const auto& group : status_field(status, "Groups")) CHECK(group != "0");
    CHECK(status_field(status, "CapEff") == std::vector<std::string>{"0000000000000000"});

    // Its work directory is shared with its group (sticky: the runner's files stay
    // the runner's); the job's record stays the runner's alone.
    struct stat work {}, record {};
    REQUIRE(::stat(sandbox.work_dir("sandboxed").c_str(), &work) == 0);
    CHECK((work.st_mode & 07777) == 01770);
    CHECK(work.st_uid == 0);
    CHECK(work.st_gid == user->pw_gid);
    REQUIRE(::stat(sandbox.job_dir("sandboxed").c_str(), &record) == 0);
    CHECK((record.st_mode & 0777) == 0700);
    CHECK(record.st_uid == 0);
  });
}

TEST_CASE("sandbox: qemu_user \"\" runs QEMU as the runner's own user, still under seccomp") {
  with_running_qemu("own-user", {{"qemu_user", ""}}, [](const std::string& status, const Sandbox&) {
    INFO(status);
    CHECK(status_field(status, "Seccomp") == std::vector<std::string>{"2"});
    const std::string uid = std::to_string(::geteuid());
    CHECK(status_field(status, "Uid") == std::vector<std::string>{uid, uid, uid, uid});
  });
}

TEST_CASE("sandbox: a qemu_user that does not exist fails the job before boot, naming it") {
  if (::geteuid() != 0) return;  // as non-root another user is refused for that reason
  Sandbox sandbox;
  const std::string id = "no-qemu-user";
  auto job = sandbox.write_json("job.json", guest_job(id, {"true"}));
  auto config = write_runner_config(sandbox, {{"qemu_user", "solstice-no-such-user"}});
  auto runner = run_to_end(sandbox.run_args(job, "tcg", config), 120s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(contains(result->error(), "qemu_user \"solstice-no-such-user\": no such user"));
  CHECK(contains(result->error(), "useradd --system"));
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
