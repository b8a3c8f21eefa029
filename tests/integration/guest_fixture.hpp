#pragma once
// Boots the built test guest (deploy/test-guest/build.sh) under QEMU for
// integration tests: fresh ed25519 user and host keys, a seed ISO made by our own
// writer, a QMP socket, a console log, the SSH port learnt through QMP. The
// destructor powers the VM off and removes everything it made.
#include <chrono>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "runtime/base/child_process.hpp"
#include "runtime/base/error.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/qmp.hpp"

namespace solstice::testing {

// What deploy/test-guest/build.sh wrote into the guest directory (guest.json).
struct TestGuestInfo {
  std::filesystem::path directory;
  std::filesystem::path disk;  // absolute
  std::string disk_format;
  std::filesystem::path kernel, initrd;  // absolute
  std::string cmdline;
  std::string machine;
  unsigned memory_mib = 256;
  std::string user_default;
  std::string sshd_started_marker;
};

// The error message of a failed Result, "" on success: for REQUIRE_MESSAGE.
template <class T>
std::string why(const Result<T>& result) {
  return result ? std::string() : result.error().message;
}

// The directory the build was configured with (SOLSTICE_TEST_GUEST_DIR).
std::filesystem::path test_guest_directory();

// Reads guest.json; a missing build is an error saying how to make it.
Result<TestGuestInfo> load_test_guest(const std::filesystem::path& directory = test_guest_directory());

// A mkdtemp directory removed (recursively) by the destructor.
class TempDir {
 public:
  static Result<TempDir> make(const std::string& prefix = "solstice-test-");
  TempDir() = default;
  TempDir(TempDir&& other) noexcept : path_(std::exchange(other.path_, {})) {}
  TempDir& operator=(TempDir&& other) noexcept;
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// Everything a child wrote to a captured pipe so far (non-blocking read).
std::string read_available(int fd);
// The last `max_bytes` of a text file, or "" when it cannot be read.
std::string file_tail(const std::filesystem::path& path, size_t max_bytes = 2000);

struct GuestOptions {
  VmBoot boot = VmBoot::disk;  // firmware boot of disk.raw, or direct kernel boot
  bool overlay = true;         // qcow2 overlay over disk.raw; else QEMU's snapshot=on
  std::string qemu_binary = "qemu-system-x86_64";
  std::chrono::milliseconds qmp_timeout{15000};
};

class Guest {
 public:
  // Starts QEMU and learns the SSH port; does not wait for SSH.
  static Result<std::unique_ptr<Guest>> boot(const GuestOptions& options = {});
  Guest(const Guest&) = delete;
  Guest& operator=(const Guest&) = delete;
  // Powers the VM off (system_powerdown, quit, SIGKILL) and removes the temp dir.
  ~Guest();

  // wait_until_ready against this guest, abandoned as soon as QEMU exits. The
  // error carries the console tail and QEMU's stderr.
  Result<SshSession> wait_for_ssh(std::chrono::milliseconds timeout = std::chrono::seconds(120));

  // system_powerdown, then waits for QEMU to exit by itself; nullopt-like error if
  // it does not within `timeout`. Returns its exit status.
  Result<ExitStatus> power_off_and_wait(std::chrono::milliseconds timeout);

  // Console log and QEMU stderr, for failure messages.
  std::string diagnostics();

  const SshTarget& ssh_target() const { return target_; }
  const SshKeyPair& user_key() const { return user_key_; }
  const SshKeyPair& host_key() const { return host_key_; }
  QmpClient& qmp() { return qmp_; }
  ChildProcess& qemu() { return qemu_; }
  const TestGuestInfo& info() const { return info_; }
  const std::filesystem::path& work_dir() const { return work_.path(); }
  std::filesystem::path console_log() const { return work_.path() / "console.log"; }
  std::filesystem::path seed_iso() const { return work_.path() / "seed.iso"; }
  std::filesystem::path qmp_socket() const { return work_.path() / "qmp.sock"; }
  std::filesystem::path overlay() const { return work_.path() / "overlay.qcow2"; }

 private:
  Guest() = default;
  void shut_down();

  TestGuestInfo info_;
  TempDir work_;
  SshKeyPair user_key_, host_key_;
  ChildProcess qemu_;
  QmpClient qmp_;
  SshTarget target_;
  std::string qemu_stderr_;
};

// "PID: command line" of every process whose command line mentions `needle`
// (what a test checks is gone after a run: a QEMU for its state directory).
std::vector<std::string> processes_mentioning(const std::string& needle);

}  // namespace solstice::testing
