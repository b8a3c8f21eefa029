// QEMU's user (runtime/vm/qemu_user) and the sandbox, down to a real QEMU started
// as an unprivileged user with its console passed as a descriptor.
#include <doctest/doctest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "runtime/base/child_process.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/qemu_user.hpp"
#include "runtime/vm/qmp.hpp"
#include "tests/unit/temp_dir.hpp"

using namespace solstice;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

mode_t mode_of(const fs::path& path) {
  struct stat info {};
  REQUIRE(::stat(path.c_str(), &info) == 0);
  return info.st_mode & 07777;
}

gid_t group_of(const fs::path& path) {
  struct stat info {};
  REQUIRE(::stat(path.c_str(), &info) == 0);
  return info.st_gid;
}

// "nobody" by its numbers, whatever this host calls it.
QemuUser nobody() { return QemuUser{"nobody", ProcessCredentials{65534, 65534, {65534}}}; }

std::string proc_status(pid_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/status");
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void run_command(const std::vector<std::string>& argv) {
  auto child = ChildProcess::spawn(argv);
  REQUIRE_MESSAGE(child.has_value(), (child ? "" : child.error().message));
  auto status = child->wait_for(30s);
  REQUIRE(status.has_value());
  REQUIRE_MESSAGE(status->code == 0, argv[0] << " failed: " << status->describe());
}

// state/run/job-1 with an overlay and a seed, as prepare leaves them (mode 0700).
struct VmDirs {
  test::TempDir top{"solstice-qemu-user-"};
  VmFiles files;
  VmDirs() {
    REQUIRE(::chmod(top.path.c_str(), 0711) == 0);  // the test's own dir: reachable
    files.state_dir = top.path / "state";
    files.work_dir = files.state_dir / "run" / "job-1";
    fs::create_directories(files.work_dir);
    for (const auto& dir : {files.state_dir, files.state_dir / "run", files.work_dir})
      REQUIRE(::chmod(dir.c_str(), 0700) == 0);
    files.writable_disk = files.work_dir / "overlay.qcow2";
    files.seed_iso = files.work_dir / "seed.iso";
    std::ofstream(files.writable_disk) << "overlay";
    std::ofstream(files.seed_iso) << "seed";
  }
};

}  // namespace

TEST_SUITE("qemu_user") {
  TEST_CASE("an empty qemu_user is the runner's own user; an unset one is solstice-qemu as root") {
    auto none = resolve_qemu_user("");
    REQUIRE(none.has_value());
    CHECK_FALSE(none->has_value());
    v1::RunnerConfig config;
    CHECK(configured_qemu_user(config) == (::geteuid() == 0 ? "solstice-qemu" : ""));
    config.set_qemu_user("");
    CHECK(configured_qemu_user(config) == "");
    config.set_qemu_user("someone");
    CHECK(configured_qemu_user(config) == "someone");
  }

  TEST_CASE("config: qemu_user defaults to solstice-qemu as root; \"\" in a file is kept") {
    test::TempDir dir;
    CHECK(configured_qemu_user(default_runner_config()) == (::geteuid() == 0 ? "solstice-qemu" : ""));
    auto left_out = load_runner_config(dir.write("a.json", "{}"));
    REQUIRE(left_out.has_value());
    CHECK(configured_qemu_user(*left_out) == (::geteuid() == 0 ? "solstice-qemu" : ""));
    auto empty = load_runner_config(dir.write("b.json", R"({"qemu_user": ""})"));
    REQUIRE(empty.has_value());
    CHECK(configured_qemu_user(*empty) == "");
    auto named = load_runner_config(dir.write("c.json", R"({"qemu_user": "ci-qemu"})"));
    REQUIRE(named.has_value());
    CHECK(configured_qemu_user(*named) == "ci-qemu");
  }

  TEST_CASE("a missing user is an error naming it and how to create it") {
    auto missing = resolve_qemu_user("solstice-no-such-user-xyz");
    REQUIRE_FALSE(missing.has_value());
    CHECK(has(missing.error().message, "qemu_user \"solstice-no-such-user-xyz\": no such user"));
    CHECK(has(missing.error().message, "useradd --system"));
    CHECK(has(missing.error().message, "qemu_user to \"\""));
  }

  TEST_CASE("root is refused as QEMU's user") {
    auto root = resolve_qemu_user("root");
    REQUIRE_FALSE(root.has_value());
    CHECK(has(root.error().message, "qemu_user \"root\" is root (uid 0)"));
  }

  TEST_CASE("as root, a user resolves to its uid, gid and groups") {
    if (::geteuid() != 0) return;
    auto user = resolve_qemu_user("nobody");
    REQUIRE_MESSAGE(user.has_value(), (user ? "" : user.error().message));
    REQUIRE(user->has_value());
    CHECK((*user)->credentials.uid == 65534);
    CHECK((*user)->credentials.groups.size() >= 1);
  }

  TEST_CASE("share_vm_files gives the work directory to the user's group and nothing above it") {
    if (::geteuid() != 0) return;  // chown to another group needs root
    VmDirs vm;
    REQUIRE(share_vm_files(nobody(), vm.files).has_value());
    CHECK(mode_of(vm.files.work_dir) == 01770);
    CHECK(group_of(vm.files.work_dir) == 65534);
    CHECK(mode_of(vm.files.writable_disk) == 0660);
    CHECK(mode_of(vm.files.seed_iso) == 0640);
    CHECK(group_of(vm.files.seed_iso) == 65534);
    CHECK(mode_of(vm.files.state_dir) == 0701);  // searchable, not listable
    CHECK(mode_of(vm.files.state_dir / "run") == 0701);
  }

  TEST_CASE("an unreachable image or state directory is an error naming the directory") {
    if (::geteuid() != 0) return;
    VmDirs vm;
    test::TempDir closed{"solstice-closed-"};  // 0700, root's
    vm.files.read_only = {closed.write("base.img", "x")};
    auto refused = share_vm_files(nobody(), vm.files);
    REQUIRE_FALSE(refused.has_value());
    INFO(refused.error().message);
    CHECK(has(refused.error().message, "cannot reach the image file " + (closed.path / "base.img").string()));
    CHECK(has(refused.error().message, closed.path.string() + " has mode 0700"));

    REQUIRE(::chmod(vm.top.path.c_str(), 0700) == 0);
    vm.files.read_only.clear();
    auto unreachable = share_vm_files(nobody(), vm.files);
    REQUIRE_FALSE(unreachable.has_value());
    CHECK(has(unreachable.error().message, "cannot reach its work directory"));
  }

  TEST_CASE("real QEMU, sandboxed, as an unprivileged user: QMP answers root, the console arrives") {
    if (::geteuid() != 0) return;
    VmDirs vm;
    run_command({"qemu-img", "create", "-q", "-f", "qcow2", vm.files.writable_disk.string(), "16M"});
    run_command({"qemu-img", "create", "-q", "-f", "raw", vm.files.seed_iso.string(), "1M"});
    const QemuUser user = nobody();
    REQUIRE(share_vm_files(user, vm.files).has_value());

    VmSpec spec;
    spec.disk = vm.files.writable_disk;
    spec.seed_iso = vm.files.seed_iso;
    spec.qmp_socket = vm.files.work_dir / "qmp.sock";
    spec.console_log = vm.files.work_dir / "console.raw";
    spec.memory_mib = 128;
    int console = ::open(spec.console_log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    REQUIRE(console >= 0);
    spec.console_fd = 3;
    SpawnOptions options;
    options.run_as = user.credentials;
    options.pass_fds = {console};
    auto qemu = ChildProcess::spawn(build_qemu_argv(spec), options);
    ::close(console);
    REQUIRE_MESSAGE(qemu.has_value(), (qemu ? "" : qemu.error().message));

    auto qmp = QmpClient::connect(spec.qmp_socket, 10s);
    if (!qmp) {
      qemu->kill(SIGKILL);
      char buffer[4096];
      ssize_t n = ::read(qemu->stderr_fd(), buffer, sizeof buffer);
      FAIL("QMP: " << qmp.error().message << "; QEMU stderr: "
                   << std::string(buffer, static_cast<size_t>(std::max<ssize_t>(n, 0))));
    }
    const std::string status = proc_status(qemu->pid());
    CHECK(has(status, "Seccomp:\t2"));
    CHECK(has(status, "Uid:\t65534\t65534\t65534\t65534"));
    CHECK(has(status, "Gid:\t65534\t65534\t65534\t65534"));
    auto running = qmp->execute("query-status");
    REQUIRE(running.has_value());
    CHECK((*running)["status"] == "running");
    auto quit = qmp->execute("quit");
    CHECK(quit.has_value());
    auto exit = qemu->wait_for(10s);
    REQUIRE(exit.has_value());
    CHECK(exit->describe() == "exit code 0");
    // QEMU wrote the console through the descriptor: the file stays root's, mode 0600.
    struct stat info {};
    REQUIRE(::stat(spec.console_log.c_str(), &info) == 0);
    CHECK(info.st_uid == 0);
    CHECK((info.st_mode & 07777) == 0600);
  }
}
