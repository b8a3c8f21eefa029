#include "tests/reliability/harness.hpp"

#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

#include <google/protobuf/util/json_util.h>

#include "runtime/job/event_log.hpp"

namespace solstice::reliability {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using steady = std::chrono::steady_clock;

fs::path runner_binary() { return fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner"; }

fs::path test_guest_dir() { return SOLSTICE_TEST_GUEST_DIR; }

std::string test_guest_problem() {
  if (!fs::exists(test_guest_dir() / "guest.json"))
    return "the test guest is not built: run deploy/test-guest/build.sh " +
           test_guest_dir().string();
  return {};
}

// ------------------------------------------------------------ Runner

namespace {

void read_into(int fd, std::string& into) {
  if (fd < 0)
    return;
  char buf[8192];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof buf)) > 0)
    into.append(buf, static_cast<size_t>(n));
}

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

}  // namespace

Runner Runner::start(const std::vector<std::string>& args) {
  std::vector<std::string> argv{runner_binary().string()};
  argv.insert(argv.end(), args.begin(), args.end());
  return start_program(argv);
}

Runner Runner::start_program(const std::vector<std::string>& argv) {
  auto child = ChildProcess::spawn(argv);
  REQUIRE_MESSAGE(child, (child ? "" : child.error().message));
  return Runner(std::move(*child));
}

void Runner::pump(std::chrono::milliseconds duration) {
  auto deadline = steady::now() + duration;
  do {
    if (!status_)
      status_ = child_.try_wait();
    read_into(child_.stdout_fd(), out_);
    read_into(child_.stderr_fd(), err_);
    if (status_)
      return;
    pollfd fds[3] = {{child_.stdout_fd(), POLLIN, 0},
                     {child_.stderr_fd(), POLLIN, 0},
                     {child_.exit_fd(), POLLIN, 0}};
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now());
    ::poll(fds, 3, static_cast<int>(std::clamp<long>(left.count(), 0, 100)));
  } while (steady::now() < deadline);
}

std::optional<ExitStatus> Runner::wait(std::chrono::milliseconds timeout) {
  auto deadline = steady::now() + timeout;
  while (!status_ && steady::now() < deadline)
    pump(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - steady::now()));
  pump(0ms);
  return status_;
}

bool Runner::wait_until(const std::function<bool()>& condition,
                        std::chrono::milliseconds timeout) {
  auto deadline = steady::now() + timeout;
  while (steady::now() < deadline) {
    if (condition())
      return true;
    if (status_)
      return condition();
    pump(100ms);
  }
  return condition();
}

Runner run_to_end(const std::vector<std::string>& args, std::chrono::milliseconds timeout) {
  auto runner = Runner::start(args);
  runner.wait(timeout);
  return runner;
}

// ------------------------------------------------------------ Sandbox

Sandbox::Sandbox() {
  // Short: the QMP socket path under state/run/<id>/ must fit a unix socket name.
  std::string pattern = (fs::temp_directory_path() / "slr-XXXXXX").string();
  REQUIRE(::mkdtemp(pattern.data()) != nullptr);
  // Like /tmp: a root runner's QEMU runs as qemu_user, which must reach the state dir,
  // and the stand-in QEMUs (qemu_wrappers.hpp) write their logs here as that user.
  REQUIRE(::chmod(pattern.c_str(), 01777) == 0);
  root_ = pattern;
}

Sandbox::~Sandbox() {
  // A failed test may leave a runner's QEMU behind: end it, by PID, after checking
  // (in processes()) that its command line names this sandbox.
  for (pid_t pid : processes()) {
    int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd < 0)
      continue;
    std::ifstream cmdline("/proc/" + std::to_string(pid) + "/cmdline");
    std::string args((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
    if (args.find(root_.string()) != std::string::npos)
      ::syscall(SYS_pidfd_send_signal, pidfd, SIGKILL, nullptr, 0);
    ::close(pidfd);
  }
  std::error_code ignored;
  fs::remove_all(root_, ignored);
}

fs::path Sandbox::write(const std::string& name, const std::string& text) const {
  auto path = root_ / name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

fs::path Sandbox::write_json(const std::string& name, const nlohmann::json& json) const {
  return write(name, json.dump(2));
}

std::vector<std::string> Sandbox::run_args(const fs::path& job, const std::string& accel,
                                           const fs::path& config,
                                           const std::vector<std::string>& extra) const {
  auto args = snapshot_run_args(job, accel, config, extra);
  // The suite is about faults of a cold boot and what follows it: its jobs boot cold
  // (templates and restored jobs: test_templates.cpp).
  args.push_back("--cold");
  return args;
}

std::vector<std::string> Sandbox::snapshot_run_args(const fs::path& job, const std::string& accel,
                                                    const fs::path& config,
                                                    const std::vector<std::string>& extra) const {
  std::vector<std::string> args{"run", job.string(), "--state-dir", state().string(), "--accel",
                                accel};
  if (!config.empty()) {
    args.push_back("--config");
    args.push_back(config.string());
  }
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::vector<pid_t> Sandbox::processes() const {
  std::vector<pid_t> found;
  std::error_code ec;
  for (fs::directory_iterator it("/proc", ec), end; !ec && it != end; it.increment(ec)) {
    auto name = it->path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos)
      continue;
    pid_t pid = std::stoi(name);
    if (pid == ::getpid() || process_gone(pid))
      continue;
    auto args = read_file(it->path() / "cmdline");
    if (args.find(root_.string()) != std::string::npos)
      found.push_back(pid);
  }
  return found;
}

std::vector<std::string> Sandbox::run_entries() const {
  std::vector<std::string> entries;
  std::error_code ec;
  for (fs::directory_iterator it(state() / "run", ec), end; !ec && it != end; it.increment(ec))
    entries.push_back(it->path().filename().string());
  return entries;
}

std::vector<v1::JobEvent> Sandbox::events(const std::string& id) const {
  // Tolerant: the runner may be writing the last line right now.
  std::vector<v1::JobEvent> events;
  std::istringstream lines(read_file(job_dir(id) / "events.jsonl"));
  std::string line;
  while (std::getline(lines, line))
    if (auto event = event_from_json_line(line))
      events.push_back(std::move(*event));
  return events;
}

std::optional<v1::JobResult> Sandbox::result(const std::string& id) const {
  auto text = read_file(job_dir(id) / "result.json");
  if (text.empty())
    return std::nullopt;
  v1::JobResult result;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage(text, &result, options).ok())
    return std::nullopt;
  return result;
}

std::optional<std::string> Sandbox::state_detail(const std::string& id, v1::JobState state) const {
  for (const auto& event : events(id))
    if (event.has_state() && event.state().state() == state)
      return event.state().detail();
  return std::nullopt;
}

std::string Sandbox::step_output(const std::string& id, uint32_t step) const {
  std::string out;
  for (const auto& event : events(id))
    if (event.has_output() && event.output().step_index() == step &&
        event.output().stream() == v1::STDOUT)
      out += event.output().data();
  return out;
}

std::vector<std::string> Sandbox::notices(const std::string& id) const {
  std::vector<std::string> notices;
  for (const auto& event : events(id))
    if (event.has_notice())
      notices.push_back(event.notice().message());
  return notices;
}

// ------------------------------------------------------------ helpers

nlohmann::json guest_job(const std::string& id, const std::vector<std::string>& scripts) {
  nlohmann::json steps = nlohmann::json::array();
  for (size_t i = 0; i < scripts.size(); ++i)
    steps.push_back({{"name", "step " + std::to_string(i + 1)}, {"script", scripts[i]}});
  return {{"id", id},
          {"name", "reliability " + id},
          {"runs_on", "solstice-test-guest"},
          {"timeout_seconds", 900},
          {"steps", steps}};
}

bool process_gone(pid_t pid) {
  auto stat = read_file("/proc/" + std::to_string(pid) + "/stat");
  auto end = stat.rfind(')');
  if (end == std::string::npos || end + 2 >= stat.size())
    return true;
  return stat[end + 2] == 'Z' || stat[end + 2] == 'X';
}

int mode_of(const fs::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return -1;
  return static_cast<int>(st.st_mode & 07777);
}

void check_nothing_left(const Sandbox& sandbox) {
  // A QEMU the runner killed may take a moment to be reaped by its new parent.
  for (int i = 0; i < 50 && !sandbox.processes().empty(); ++i)
    std::this_thread::sleep_for(100ms);
  auto processes = sandbox.processes();
  std::string listed;
  for (pid_t pid : processes) {
    auto args = read_file("/proc/" + std::to_string(pid) + "/cmdline");
    std::replace(args.begin(), args.end(), '\0', ' ');
    listed += "\n  " + std::to_string(pid) + ": " + args.substr(0, 300);
  }
  CHECK_MESSAGE(processes.empty(), "processes left behind:" << listed);
  auto entries = sandbox.run_entries();
  std::string names;
  for (const auto& entry : entries)
    names += " " + entry;
  CHECK_MESSAGE(entries.empty(), "left in run/:" << names);
}

std::string describe(const std::optional<ExitStatus>& status) {
  return status ? status->describe() : "still running";
}

}  // namespace solstice::reliability
