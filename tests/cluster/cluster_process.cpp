#include "tests/cluster/cluster_process.hpp"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <regex>
#include <stdexcept>
#include <thread>

namespace solstice::cluster_testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

fs::path runner_binary() { return fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner"; }

fs::path embedded_host_binary() {
  return fs::path(SOLSTICE_BINARY_DIR) / "examples" / "embedded_host" / "embedded_host";
}

TempDir::TempDir() {
  std::string pattern = (fs::temp_directory_path() / "solstice-cluster-XXXXXX").string();
  if (!::mkdtemp(pattern.data()))
    throw std::runtime_error("mkdtemp failed");
  // Searchable: a root runner's QEMU runs as qemu_user and must reach its state dir.
  if (::chmod(pattern.c_str(), 0711) != 0)
    throw std::runtime_error("cannot chmod " + pattern);
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ignored;
  fs::remove_all(path_, ignored);
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream file{path, std::ios::binary | std::ios::trunc};
  file << text;
}

RunnerProcess::RunnerProcess(std::vector<std::string> args)
    : RunnerProcess(runner_binary(), std::move(args)) {}

RunnerProcess::RunnerProcess(const fs::path& program, std::vector<std::string> args) {
  // These tests are not about how a VM starts: nodes boot cold (with the default
  // snapshots: auto, each test's fresh state dir would first build a template).
  if (!args.empty() && args[0] == "node")
    args.push_back("--cold");
  args.insert(args.begin(), program.string());
  auto child = ChildProcess::spawn(args);
  if (!child)
    start_error = child.error().message;
  else
    child_ = std::move(*child);
}

namespace {

void drain(int fd, std::string& into, bool& open) {
  char buffer[65536];
  while (open && fd >= 0) {
    auto n = ::read(fd, buffer, sizeof buffer);
    if (n > 0)
      into.append(buffer, static_cast<size_t>(n));
    else if (n == 0)
      open = false;
    else if (errno == EINTR)
      continue;
    else {
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        open = false;
      return;
    }
  }
}

}  // namespace

void RunnerProcess::pump() {
  if (!started())
    return;
  drain(child_.stdout_fd(), out_, out_open_);
  drain(child_.stderr_fd(), err_, err_open_);
  if (!status_)
    status_ = child_.try_wait();
}

bool RunnerProcess::wait_for_output(const std::string& text, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    pump();
    if (out_.find(text) != std::string::npos || err_.find(text) != std::string::npos)
      return true;
    if (status_ || Clock::now() >= deadline || !started())
      return false;
    std::this_thread::sleep_for(50ms);
  }
}

std::optional<ExitStatus> RunnerProcess::wait_exit(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    pump();
    if (status_ || !started() || Clock::now() >= deadline)
      break;
    std::this_thread::sleep_for(50ms);
  }
  // What it wrote just before exiting.
  pump();
  return status_;
}

std::string RunnerProcess::describe() {
  pump();
  auto tail = [](const std::string& text) {
    return text.substr(text.size() > 4000 ? text.size() - 4000 : 0);
  };
  return (status_ ? status_->describe() : std::string{"still running"}) +
         (start_error.empty() ? "" : " (" + start_error + ")") + "\n--- stdout ---\n" +
         tail(out_) + "\n--- stderr ---\n" + tail(err_);
}

OneNodeCluster::OneNodeCluster()
    : coordinator{{"coordinator", "--listen", "127.0.0.1:0", "--insecure"}},
      state(dir.path() / "state") {
  auto found = coordinator_endpoint(coordinator, 20s);
  REQUIRE_MESSAGE(found, coordinator.describe());
  endpoint = *found;
  node.emplace(std::vector<std::string>{
    "node", "--join", endpoint, "--insecure", "--name", "node-1", "--slots", "1", "--memory-mib",
    "2048", "--state-dir", state.string(), "--accel", "tcg"});
  REQUIRE_MESSAGE(node->wait_for_output("joined the coordinator", 30s), node->describe());
}

OneNodeCluster::~OneNodeCluster() {
  if (node) {
    node->kill(SIGTERM);
    CHECK_MESSAGE(node->wait_exit(60s), node->describe());
  }
  coordinator.kill(SIGTERM);
  CHECK_MESSAGE(coordinator.wait_exit(20s), coordinator.describe());
}

RunnerProcess OneNodeCluster::submit(const fs::path& job) {
  return RunnerProcess{{"submit", "--to", endpoint, "--insecure", job.string()}};
}

bool qemu_mentions(const std::string& needle) {
  DIR* proc = ::opendir("/proc");
  if (!proc)
    return false;
  bool found = false;
  while (auto* entry = ::readdir(proc)) {
    std::string name = entry->d_name;
    if (name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    std::ifstream file{"/proc/" + name + "/cmdline", std::ios::binary};
    std::string cmdline((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    if (cmdline.find("qemu") != std::string::npos && cmdline.find(needle) != std::string::npos)
      found = true;
  }
  ::closedir(proc);
  return found;
}

std::optional<std::string> coordinator_endpoint(RunnerProcess& coordinator,
                                                std::chrono::milliseconds timeout) {
  if (!coordinator.wait_for_output("listening on ", timeout))
    return std::nullopt;
  std::smatch match;
  static const std::regex listening{"listening on ([0-9.]+:[0-9]+)"};
  const auto& out = coordinator.out();
  if (!std::regex_search(out, match, listening))
    return std::nullopt;
  return match[1].str();
}

}  // namespace solstice::cluster_testing
