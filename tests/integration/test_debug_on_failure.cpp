// debug-on-failure: a failed job keeps its VM up, says exactly how to get in, and
// the way in works; ending the hold removes the key and the VM.
#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

#include "runtime/base/child_process.hpp"

using namespace solstice;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

std::string read_some(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0)
    out.append(buf, static_cast<size_t>(n));
  return out;
}

}  // namespace

TEST_CASE("debug-on-failure keeps the failed VM reachable with the printed ssh command") {
  std::string pattern = (fs::temp_directory_path() / "solstice-debug-XXXXXX").string();
  fs::path dir = ::mkdtemp(pattern.data());
  // Searchable: a root runner's QEMU runs as qemu_user and must reach its state dir.
  REQUIRE(::chmod(dir.c_str(), 0711) == 0);
  auto state = dir / "state";
  auto job = dir / "job.json";
  std::ofstream(job) << R"({"runs_on": "solstice-test-guest",
    "debug_on_failure": {"enabled": true, "keep_seconds": 120},
    "steps": [{"name": "breaks", "script": "echo marker > /tmp/left-behind; exit 4"}]})";

  auto runner = ChildProcess::spawn({std::string(SOLSTICE_BINARY_DIR) + "/solstice-runner", "run",
                                     job.string(), "--accel", "tcg", "--state-dir",
                                     state.string(), "--cold"});
  REQUIRE(runner);
  std::string out;
  std::smatch found;
  const std::regex command{R"(ssh -i (\S+) -o UserKnownHostsFile=(\S+) -p (\d+) (\w+)@127\.0\.0\.1)"};
  auto deadline = std::chrono::steady_clock::now() + 240s;
  while (!std::regex_search(out, found, command) && std::chrono::steady_clock::now() < deadline &&
         runner->running()) {
    pollfd readable{runner->stdout_fd(), POLLIN, 0};
    ::poll(&readable, 1, 200);
    out += read_some(runner->stdout_fd());
  }
  REQUIRE_MESSAGE(std::regex_search(out, found, command), out);
  std::string key = found[1], known_hosts = found[2], port = found[3], user = found[4];

  struct stat key_stat{};
  REQUIRE(::stat(key.c_str(), &key_stat) == 0);
  CHECK((key_stat.st_mode & 0777) == 0600);

  // The printed command works as printed, with the host key checked strictly.
  auto ssh = ChildProcess::spawn({"ssh", "-i", key, "-o", "UserKnownHostsFile=" + known_hosts,
                                  "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p",
                                  port, user + "@127.0.0.1", "cat /tmp/left-behind"});
  REQUIRE(ssh);
  auto ssh_exit = ssh->wait_for(60s);
  REQUIRE(ssh_exit);
  CHECK(ssh_exit->code == 0);
  CHECK(read_some(ssh->stdout_fd()) == "marker\n");

  // Cancelling ends the hold: the VM goes, the key goes, the job stays failed.
  runner->kill(SIGINT);
  auto exit = runner->wait_for(90s);
  REQUIRE(exit);
  CHECK(exit->code == 4);
  CHECK_FALSE(fs::exists(key));
  CHECK_FALSE(fs::exists(known_hosts));
  std::error_code ec;
  CHECK(fs::is_empty(state / "run", ec));
  fs::remove_all(dir, ec);
}
