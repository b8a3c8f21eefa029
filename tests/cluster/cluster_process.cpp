#include "tests/cluster/cluster_process.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
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
