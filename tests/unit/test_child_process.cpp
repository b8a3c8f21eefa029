#include <doctest/doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "runtime/base/child_process.hpp"
#include "runtime/base/proc_stat.hpp"
#include "runtime/base/idle_watch.hpp"

using namespace solstice;
using namespace std::chrono_literals;

namespace {

// Reads stdout and stderr until both reach EOF (the child closed them), up to `limit`.
struct Captured {
  std::string out, err;
};

Captured read_all(ChildProcess& child, std::chrono::milliseconds limit) {
  Captured captured;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  bool out_open = child.stdout_fd() >= 0, err_open = child.stderr_fd() >= 0;
  while ((out_open || err_open) && std::chrono::steady_clock::now() < deadline) {
    pollfd fds[2] = {{out_open ? child.stdout_fd() : -1, POLLIN, 0},
                     {err_open ? child.stderr_fd() : -1, POLLIN, 0}};
    ::poll(fds, 2, 100);
    char chunk[4096];
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      ssize_t n = ::read(fds[i].fd, chunk, sizeof chunk);
      if (n > 0) {
        (i == 0 ? captured.out : captured.err).append(chunk, static_cast<size_t>(n));
      } else if (n == 0) {
        (i == 0 ? out_open : err_open) = false;
      }
    }
  }
  return captured;
}

// The state letter of /proc/PID/stat ('Z' for a zombie), or 0 if there is no such process.
char process_state(pid_t pid) {
  std::ifstream stat_file("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  size_t comm_end = stat.rfind(')');
  if (comm_end == std::string::npos || comm_end + 2 >= stat.size()) return 0;
  return stat[comm_end + 2];
}

}  // namespace

TEST_SUITE("child_process") {
  TEST_CASE("exit code is reported") {
    auto child = ChildProcess::spawn({"sh", "-c", "exit 3"});
    REQUIRE(child.has_value());
    auto status = child->wait_for(5s);
    REQUIRE(status.has_value());
    CHECK_FALSE(status->signaled);
    CHECK(status->code == 3);
    CHECK(status->describe() == "exit code 3");
    CHECK_FALSE(child->running());
    // A second call returns the same cached status.
    CHECK(child->try_wait()->code == 3);
  }

  TEST_CASE("death by signal is reported with its name") {
    auto child = ChildProcess::spawn({"sh", "-c", "kill -9 $$"});
    REQUIRE(child.has_value());
    auto status = child->wait_for(5s);
    REQUIRE(status.has_value());
    CHECK(status->signaled);
    CHECK(status->signal == 9);
    CHECK(status->describe() == "signal 9 (KILL)");
    CHECK(signal_name(SIGTERM) == "TERM");
    CHECK(signal_name(200) == "SIG200");
  }

  TEST_CASE("stdout and stderr are captured byte-exact") {
    auto child = ChildProcess::spawn({"sh", "-c", "printf 'out\\000put\\n'; printf 'err\\001or' >&2"});
    REQUIRE(child.has_value());
    Captured captured = read_all(*child, 5s);
    CHECK(captured.out == std::string("out\0put\n", 8));
    CHECK(captured.err == std::string("err\001or"));
    auto status = child->wait_for(5s);
    REQUIRE(status.has_value());
    CHECK(status->code == 0);
  }

  TEST_CASE("output larger than a pipe buffer is read while the child runs") {
    constexpr size_t kBytes = 1 << 20;  // 16x the default 64 KiB pipe buffer
    auto child = ChildProcess::spawn({"sh", "-c", "yes abcdefghij | head -c 1048576"});
    REQUIRE(child.has_value());
    // The child blocks on a full pipe until we read: it cannot have finished yet.
    std::this_thread::sleep_for(100ms);
    CHECK(child->running());
    Captured captured = read_all(*child, 20s);
    std::string expected;
    while (expected.size() < kBytes) expected += "abcdefghij\n";
    expected.resize(kBytes);
    CHECK(captured.out.size() == kBytes);
    CHECK(captured.out == expected);
    CHECK(captured.err.empty());
    REQUIRE(child->wait_for(5s).has_value());
  }

  TEST_CASE("uncaptured streams go to /dev/null") {
    SpawnOptions options;
    options.capture_stdout = false;
    options.capture_stderr = false;
    auto child = ChildProcess::spawn({"sh", "-c", "echo hidden; echo hidden >&2"}, options);
    REQUIRE(child.has_value());
    CHECK(child->stdout_fd() == -1);
    CHECK(child->stderr_fd() == -1);
    CHECK(child->wait_for(5s)->code == 0);
  }

  TEST_CASE("a missing binary is an error naming it") {
    auto child = ChildProcess::spawn({"solstice-no-such-program-xyz", "--flag"});
    REQUIRE_FALSE(child.has_value());
    CHECK(child.error().message.find("solstice-no-such-program-xyz") != std::string::npos);

    auto by_path = ChildProcess::spawn({"/nonexistent/dir/qemu"});
    REQUIRE_FALSE(by_path.has_value());
    CHECK(by_path.error().message.find("/nonexistent/dir/qemu") != std::string::npos);
  }

  TEST_CASE("an exec failure in the child is reported with its errno") {
    // Executable by mode but not a loadable program: access() passes, execve fails.
    char dir_template[] = "/tmp/solstice-child-XXXXXX";
    REQUIRE(::mkdtemp(dir_template) != nullptr);
    std::string program = std::string(dir_template) + "/not-a-program";
    { std::ofstream(program) << "\x7f" "ELF garbage"; }
    ::chmod(program.c_str(), 0755);
    auto child = ChildProcess::spawn({program});
    ::unlink(program.c_str());
    ::rmdir(dir_template);
    REQUIRE_FALSE(child.has_value());
    CHECK(child.error().message.find(program) != std::string::npos);
    CHECK(child.error().message.find("Exec format error") != std::string::npos);
  }

  TEST_CASE("passed descriptors arrive as 3, 4, ... and nothing else is inherited") {
    int first[2], second[2];
    REQUIRE(::pipe2(first, O_CLOEXEC) == 0);
    REQUIRE(::pipe2(second, O_CLOEXEC) == 0);
    SpawnOptions options;
    options.pass_fds = {second[1], first[1]};  // in an order unlike their numbers
    auto child = ChildProcess::spawn(
      {"/bin/sh", "-c", "echo to-three >&3; echo to-four >&4; ls /proc/self/fd | sort -n | tr '\\n' ' '"},
      options);
    ::close(first[1]);
    ::close(second[1]);
    REQUIRE_MESSAGE(child.has_value(), (child ? "" : child.error().message));
    auto captured = read_all(*child, 10s);
    REQUIRE(child->wait_for(10s).has_value());
    char buffer[64] = {};
    CHECK(std::string(buffer, static_cast<size_t>(::read(second[0], buffer, sizeof buffer))) == "to-three\n");
    CHECK(std::string(buffer, static_cast<size_t>(::read(first[0], buffer, sizeof buffer))) == "to-four\n");
    ::close(first[0]);
    ::close(second[0]);
    // ls itself holds one more (the directory it reads) above 4.
    CHECK(captured.out.rfind("0 1 2 3 4 ", 0) == 0);
  }

  TEST_CASE("run_as: the child has the user's uid, gid and groups only (root)") {
    if (::geteuid() != 0) return;  // only root can switch users
    SpawnOptions options;
    options.run_as = ProcessCredentials{65534, 65534, {65534}};
    auto child = ChildProcess::spawn({"/bin/sh", "-c", "id -u; id -g; id -G; sleep 0.2"}, options);
    REQUIRE_MESSAGE(child.has_value(), (child ? "" : child.error().message));
    auto captured = read_all(*child, 10s);
    auto status = child->wait_for(10s);
    REQUIRE(status.has_value());
    CHECK(status->describe() == "exit code 0");
    CHECK(captured.out == "65534\n65534\n65534\n");
  }

  TEST_CASE("run_as: a program the user may not execute is an error naming it and the uid (root)") {
    if (::geteuid() != 0) return;
    char dir_template[] = "/tmp/solstice-child-XXXXXX";  // mode 0700: closed to uid 65534
    REQUIRE(::mkdtemp(dir_template) != nullptr);
    std::string program = std::string(dir_template) + "/prog";
    { std::ofstream(program) << "#!/bin/sh\nexit 0\n"; }
    ::chmod(program.c_str(), 0755);
    SpawnOptions options;
    options.run_as = ProcessCredentials{65534, 65534, {}};
    auto child = ChildProcess::spawn({program}, options);
    ::unlink(program.c_str());
    ::rmdir(dir_template);
    REQUIRE_FALSE(child.has_value());
    CHECK(child.error().message.find(program) != std::string::npos);
    CHECK(child.error().message.find("uid 65534") != std::string::npos);
    CHECK(child.error().message.find("Permission denied") != std::string::npos);
  }

  TEST_CASE("wait_for times out on a sleeper and kill ends it") {
    auto child = ChildProcess::spawn({"sleep", "100"});
    REQUIRE(child.has_value());
    const auto started = std::chrono::steady_clock::now();
    CHECK_FALSE(child->wait_for(200ms).has_value());
    const auto waited = std::chrono::steady_clock::now() - started;
    CHECK(waited >= 190ms);
    CHECK(waited < 2s);
    CHECK(child->running());
    child->kill(SIGTERM);
    auto status = child->wait_for(5s);
    REQUIRE(status.has_value());
    CHECK(status->signaled);
    CHECK(status->signal == SIGTERM);
  }

  TEST_CASE("the exit fd becomes readable when the child exits") {
    auto child = ChildProcess::spawn({"sleep", "0.2"});
    REQUIRE(child.has_value());
    REQUIRE(child->exit_fd() >= 0);
    pollfd exit_poll{child->exit_fd(), POLLIN, 0};
    CHECK(::poll(&exit_poll, 1, 0) == 0);
    CHECK(::poll(&exit_poll, 1, 5000) == 1);
    CHECK(child->try_wait().has_value());
  }

  TEST_CASE("the child runs in its own session") {
    auto child = ChildProcess::spawn({"sleep", "100"});
    REQUIRE(child.has_value());
    // setsid() runs before exec, and spawn() returns only once exec has happened.
    CHECK(::getsid(child->pid()) == child->pid());
    CHECK(::getpgid(child->pid()) == child->pid());
    CHECK(::getsid(child->pid()) != ::getsid(0));
  }

  TEST_CASE("the destructor kills and reaps: no zombie is left") {
    pid_t pid;
    {
      auto child = ChildProcess::spawn({"sleep", "100"});
      REQUIRE(child.has_value());
      pid = child->pid();
      CHECK(::kill(pid, 0) == 0);
    }
    CHECK(process_state(pid) == 0);
    errno = 0;
    CHECK(::waitpid(pid, nullptr, WNOHANG) == -1);
    CHECK(errno == ECHILD);
  }

  TEST_CASE("moving a child keeps one owner; assigning over one reaps the old") {
    auto first = ChildProcess::spawn({"sleep", "100"});
    auto second = ChildProcess::spawn({"sleep", "100"});
    REQUIRE(first.has_value());
    REQUIRE(second.has_value());
    const pid_t first_pid = first->pid(), second_pid = second->pid();
    ChildProcess holder = std::move(*first);
    CHECK(holder.pid() == first_pid);
    CHECK(first->pid() == -1);
    holder = std::move(*second);
    CHECK(holder.pid() == second_pid);
    CHECK(process_state(first_pid) == 0);  // killed and reaped by the assignment
    CHECK(holder.running());
  }

  TEST_CASE("a child spawned from a thread that exits keeps running") {
    ChildProcess child;
    std::thread spawner([&] {
      auto spawned = ChildProcess::spawn({"sleep", "100"});
      REQUIRE(spawned.has_value());
      child = std::move(*spawned);
    });
    spawner.join();
    // PR_SET_PDEATHSIG fires on the exit of the thread that forked; it must not have.
    std::this_thread::sleep_for(300ms);
    CHECK(child.running());
    CHECK(process_state(child.pid()) == 'S');
  }

  TEST_CASE("the child dies when the parent process dies") {
    SpawnOptions options;
    SUBCASE("as the runner's user") {}
    // A change of uid clears the parent-death signal: it must be set after the switch.
    SUBCASE("as another user (root)") {
      if (::geteuid() != 0) return;
      options.run_as = ProcessCredentials{65534, 65534, {}};
    }
    // Orphans are re-parented to us rather than to init, so we can reap the sleeper
    // and see what killed it.
    REQUIRE(::prctl(PR_SET_CHILD_SUBREAPER, 1) == 0);
    int report[2];
    REQUIRE(::pipe(report) == 0);
    pid_t helper = ::fork();
    REQUIRE(helper >= 0);
    if (helper == 0) {
      ::close(report[0]);
      auto sleeper = ChildProcess::spawn({"sleep", "100"}, options);
      pid_t pid = sleeper ? sleeper->pid() : -1;
      ssize_t written = ::write(report[1], &pid, sizeof pid);
      (void)written;
      ::_exit(0);  // no destructors: the sleeper must die with this process alone
    }
    ::close(report[1]);
    pid_t sleeper_pid = -1;
    pollfd readable{report[0], POLLIN, 0};
    CHECK(::poll(&readable, 1, 10000) == 1);
    CHECK(::read(report[0], &sleeper_pid, sizeof sleeper_pid) == sizeof sleeper_pid);
    ::close(report[0]);
    int helper_status = 0;
    CHECK(::waitpid(helper, &helper_status, 0) == helper);
    CHECK(WIFEXITED(helper_status));

    if (sleeper_pid > 0) {
      int sleeper_status = 0;
      pid_t reaped = 0;
      const auto deadline = std::chrono::steady_clock::now() + 1s;
      while ((reaped = ::waitpid(sleeper_pid, &sleeper_status, WNOHANG)) == 0 &&
             std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(10ms);
      CHECK(reaped == sleeper_pid);
      if (reaped == sleeper_pid) {
        CHECK(WIFSIGNALED(sleeper_status));
        CHECK(WTERMSIG(sleeper_status) == SIGKILL);
      } else {  // still alive: end it so it does not outlive the test
        ::kill(sleeper_pid, SIGKILL);
        ::waitpid(sleeper_pid, nullptr, 0);
      }
    } else {
      FAIL("the helper could not spawn the sleeper");
    }
    ::prctl(PR_SET_CHILD_SUBREAPER, 0);
  }

  TEST_CASE("process_start_time is stable for a live process and empty for a dead one") {
    auto self = process_start_time(::getpid());
    REQUIRE(self.has_value());
    CHECK(*self > 0);
    CHECK(process_start_time(::getpid()) == self);

    auto child = ChildProcess::spawn({"sleep", "100"});
    REQUIRE(child.has_value());
    const pid_t pid = child->pid();
    auto child_start = process_start_time(pid);
    REQUIRE(child_start.has_value());
    CHECK(*child_start >= *self);
    child->kill(SIGKILL);
    REQUIRE(child->wait_for(5s).has_value());
    CHECK_FALSE(process_start_time(pid).has_value());
    CHECK_FALSE(process_start_time(-1).has_value());
  }

  TEST_CASE("process_start_time reads past a command name with spaces and parentheses") {
    char dir_template[] = "/tmp/solstice-child-XXXXXX";
    REQUIRE(::mkdtemp(dir_template) != nullptr);
    std::string odd_name = std::string(dir_template) + "/a) b (c";
    REQUIRE(::symlink("/bin/sleep", odd_name.c_str()) == 0);
    auto child = ChildProcess::spawn({odd_name, "100"});
    REQUIRE(child.has_value());
    auto start = process_start_time(child->pid());
    // The kernel's own view of field 22, for comparison: the 20th word after the last ')'.
    std::ifstream stat_file("/proc/" + std::to_string(child->pid()) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
    ::unlink(odd_name.c_str());
    ::rmdir(dir_template);
    CHECK(stat.find("(a) b (c)") != std::string::npos);
    std::istringstream after_comm(stat.substr(stat.rfind(')') + 1));
    std::string word;
    for (int field = 3; field <= 22; ++field) after_comm >> word;
    REQUIRE(start.has_value());
    CHECK(std::to_string(*start) == word);
  }

  TEST_CASE("process_cpu_time grows while a process computes, not while it sleeps, and is empty once it is gone") {
    auto busy = ChildProcess::spawn({"sh", "-c", "while :; do :; done"});
    auto idle = ChildProcess::spawn({"sleep", "100"});
    REQUIRE(busy.has_value());
    REQUIRE(idle.has_value());
    auto busy_before = process_cpu_time(busy->pid()), idle_before = process_cpu_time(idle->pid());
    REQUIRE(busy_before.has_value());
    REQUIRE(idle_before.has_value());
    std::this_thread::sleep_for(600ms);
    auto busy_after = process_cpu_time(busy->pid()), idle_after = process_cpu_time(idle->pid());
    REQUIRE(busy_after.has_value());
    // On a loaded machine the loop gets less than its core, but not nothing.
    CHECK(*busy_after - *busy_before >= 50ms);
    CHECK(*idle_after - *idle_before <= 20ms);
    const pid_t pid = busy->pid();
    busy->kill(SIGKILL);
    idle->kill(SIGKILL);
    REQUIRE(busy->wait_for(5s).has_value());
    REQUIRE(idle->wait_for(5s).has_value());
    CHECK_FALSE(process_cpu_time(pid).has_value());
    CHECK_FALSE(process_cpu_time(-1).has_value());
  }

  TEST_CASE("IdleWatch: idle once the CPU share stayed low for the quiet time in a row") {
    using Clock = IdleWatch::Clock;
    const auto t0 = Clock::time_point{} + 1h;
    IdleWatch watch(0.15, 500ms);
    CHECK_FALSE(watch.sample(t0, 1000ms));               // a first sample says nothing
    CHECK_FALSE(watch.sample(t0 + 100ms, 1100ms));       // busy: a whole core
    CHECK_FALSE(watch.sample(t0 + 200ms, 1110ms));       // 10 %: quiet from t0+100ms
    CHECK_FALSE(watch.sample(t0 + 400ms, 1120ms));
    CHECK_FALSE(watch.sample(t0 + 500ms, 1150ms));       // 30 %: busy again, counting restarts
    CHECK_FALSE(watch.sample(t0 + 600ms, 1150ms));
    CHECK_FALSE(watch.sample(t0 + 900ms, 1160ms));       // quiet for 400 ms
    CHECK(watch.sample(t0 + 1100ms, 1160ms));            // quiet since t0+500ms: idle
    CHECK(watch.sample(t0 + 1200ms, 1170ms));            // and stays so while quiet
    CHECK_FALSE(watch.sample(t0 + 1300ms, 1300ms));      // busy: no longer
    CHECK_FALSE(watch.sample(t0 + 1300ms, 1400ms));      // no time passed: nothing learnt
  }
}
