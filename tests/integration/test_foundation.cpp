// The foundation end to end: boot the test guest with our own seed ISO, find SSH
// through QMP, authenticate with a fresh key, verify the host key we generated,
// run commands and a script, power off through QMP. Plus the bad inputs.
#include <doctest/doctest.h>

#include <signal.h>

#include <chrono>

#include "runtime/base/child_process.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/qmp.hpp"
#include "tests/integration/guest_fixture.hpp"

using namespace solstice;
using namespace solstice::testing;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

std::string run_ok(SshSession& ssh, const std::string& command) {
  std::string out, err;
  auto outcome = ssh.exec(command, [&](SshStream stream, std::string_view bytes) {
    (stream == SshStream::out ? out : err).append(bytes);
  });
  REQUIRE_MESSAGE(outcome.has_value(), why(outcome));
  CHECK_MESSAGE(outcome->exit_code == 0, (command + " stderr: " + err));
  return out;
}

}  // namespace

TEST_SUITE("foundation") {

TEST_CASE("boot from the disk image, SSH in, run a script, power off through QMP") {
  auto booted = Guest::boot({.boot = VmBoot::disk});
  REQUIRE_MESSAGE(booted.has_value(), why(booted));
  Guest& vm = **booted;
  CHECK(vm.ssh_target().host == "127.0.0.1");
  CHECK(vm.ssh_target().port != 0);
  CHECK(vm.ssh_target().port != 22);

  auto ssh = vm.wait_for_ssh(120s);
  REQUIRE_MESSAGE(ssh.has_value(), why(ssh));
  CHECK(ssh->host_key() == vm.host_key().public_blob);

  std::string uname = run_ok(*ssh, "uname -a");
  CHECK(uname.find("Linux") != std::string::npos);
  // The seed ISO was read: the hostname and user come from it.
  CHECK(run_ok(*ssh, "hostname") == "solstice-test\n");
  CHECK(run_ok(*ssh, "id -un") == vm.ssh_target().user + "\n");

  auto uploaded = ssh->upload("#!/bin/sh\necho \"hello from $(hostname)\"\n", "/tmp/hello.sh", 0755);
  REQUIRE_MESSAGE(uploaded.has_value(), why(uploaded));
  CHECK(run_ok(*ssh, "/tmp/hello.sh") == "hello from solstice-test\n");

  // The kernel came off the disk image through the firmware's boot loader (which
  // adds BOOT_IMAGE=), not from QEMU's -kernel.
  CHECK(run_ok(*ssh, "cat /proc/cmdline").find("BOOT_IMAGE=") != std::string::npos);
  auto started = Clock::now();
  auto status = vm.power_off_and_wait(20s);
  auto elapsed = Clock::now() - started;
  REQUIRE_MESSAGE(status.has_value(), why(status));
  CHECK_FALSE(status->signaled);
  CHECK(status->code == 0);
  CHECK(elapsed < 10s);
  bool saw_shutdown = false;
  while (auto event = vm.qmp().next_event(1s)) {
    if (event->event == "SHUTDOWN") {
      saw_shutdown = true;
      CHECK(event->data.value("guest", false));
      break;
    }
  }
  CHECK(saw_shutdown);
}

TEST_CASE("direct kernel boot reaches SSH too") {
  auto booted = Guest::boot({.boot = VmBoot::kernel, .overlay = false});
  REQUIRE_MESSAGE(booted.has_value(), why(booted));
  auto ssh = (*booted)->wait_for_ssh(120s);
  REQUIRE_MESSAGE(ssh.has_value(), why(ssh));
  CHECK(ssh->host_key() == (*booted)->host_key().public_blob);
  CHECK(run_ok(*ssh, "cat /proc/cmdline").find((*booted)->info().cmdline) != std::string::npos);
}

TEST_CASE("waiting for SSH stops at once when QEMU exits") {
  auto booted = Guest::boot();
  REQUIRE_MESSAGE(booted.has_value(), why(booted));
  Guest& vm = **booted;
  vm.qemu().kill(SIGKILL);
  auto started = Clock::now();
  auto ssh = vm.wait_for_ssh(60s);
  auto elapsed = Clock::now() - started;
  REQUIRE_FALSE(ssh.has_value());
  CHECK(ssh.error().message.find("gave up") != std::string::npos);
  CHECK(ssh.error().message.find("QEMU exited") != std::string::npos);
  CHECK(elapsed < 3s);
}

TEST_CASE("a missing QEMU binary is an error naming it") {
  auto spawned = ChildProcess::spawn({"qemu-system-does-not-exist", "-version"});
  REQUIRE_FALSE(spawned.has_value());
  CHECK(spawned.error().message.find("qemu-system-does-not-exist") != std::string::npos);

  auto booted = Guest::boot({.qemu_binary = "qemu-system-does-not-exist"});
  REQUIRE_FALSE(booted.has_value());
  CHECK(booted.error().message.find("qemu-system-does-not-exist") != std::string::npos);
}

TEST_CASE("an image that does not exist: QEMU fails and says which path") {
  auto work = TempDir::make();
  REQUIRE(work.has_value());
  VmSpec spec;
  spec.disk = work->path() / "missing-image.qcow2";
  spec.qmp_socket = work->path() / "qmp.sock";
  spec.console_log = work->path() / "console.log";
  auto qemu = ChildProcess::spawn(build_qemu_argv(spec), {.capture_stdout = false});
  REQUIRE_MESSAGE(qemu.has_value(), why(qemu));
  auto status = qemu->wait_for(30s);
  REQUIRE(status.has_value());
  CHECK((status->signaled || status->code != 0));
  std::string stderr_text = read_available(qemu->stderr_fd());
  CHECK_MESSAGE(stderr_text.find(spec.disk.string()) != std::string::npos, stderr_text);
}

TEST_CASE("a QMP socket that never appears: clear error within the timeout") {
  auto work = TempDir::make();
  REQUIRE(work.has_value());
  auto socket = work->path() / "never.sock";
  auto started = Clock::now();
  auto qmp = QmpClient::connect(socket, 1s);
  auto elapsed = Clock::now() - started;
  REQUIRE_FALSE(qmp.has_value());
  CHECK(qmp.error().message.find(socket.string()) != std::string::npos);
  CHECK(elapsed >= 1s);
  CHECK(elapsed < 3s);
}

TEST_CASE("a guest directory without guest.json says how to build it") {
  auto work = TempDir::make();
  REQUIRE(work.has_value());
  auto info = load_test_guest(work->path());
  REQUIRE_FALSE(info.has_value());
  CHECK(info.error().message.find("deploy/test-guest/build.sh") != std::string::npos);
  CHECK(info.error().message.find((work->path() / "guest.json").string()) != std::string::npos);
}

}  // TEST_SUITE
