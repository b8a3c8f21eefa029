// Spawning, waiting, killing and the child-side set-up (user switch, passed fds,
// death signal) share the ChildProcess state; kept together (about 500 lines).
// What /proc says about any process is in proc_stat.hpp.
#include "runtime/base/child_process.hpp"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <future>
#include <mutex>
#include <sstream>
#include <system_error>
#include <thread>
#include <utility>

extern char** environ;

namespace solstice {

std::string ExitStatus::describe() const {
  if (signaled) return "signal " + std::to_string(signal) + " (" + signal_name(signal) + ")";
  return "exit code " + std::to_string(code);
}

std::string signal_name(int signal) {
  if (const char* abbrev = sigabbrev_np(signal)) return abbrev;
  return "SIG" + std::to_string(signal);
}

namespace {

int pidfd_open(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

int pidfd_send_signal(int pidfd, int signal) {
#ifdef SYS_pidfd_send_signal
  return static_cast<int>(::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0));
#else
  errno = ENOSYS;
  return -1;
#endif
}

void close_fd(int& fd) {
  if (fd >= 0) ::close(fd);
  fd = -1;
}

// Owns a file descriptor until released; closes it on every early return.
struct FdGuard {
  int fd = -1;
  FdGuard() = default;
  explicit FdGuard(int f) : fd(f) {}
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  ~FdGuard() { close_fd(fd); }
  int release() {
    int f = fd;
    fd = -1;
    return f;
  }
};

// Resolves argv[0] like execvp would, but in the parent: execvp is not
// async-signal-safe, and a missing binary is best reported before forking.
Result<std::string> resolve_executable(const std::string& name) {
  if (name.empty()) return fail("cannot spawn a process: empty program name");
  if (name.find('/') != std::string::npos) {
    if (::access(name.c_str(), X_OK) != 0)
      return fail(errno_message("cannot execute " + name, errno));
    return name;
  }
  const char* path_env = std::getenv("PATH");
  std::string search = path_env ? path_env : "/usr/local/bin:/usr/bin:/bin";
  std::stringstream directories(search);
  std::string directory;
  while (std::getline(directories, directory, ':')) {
    if (directory.empty()) directory = ".";
    std::string candidate = directory + "/" + name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return fail("cannot spawn " + name + ": program not found in PATH (" + search + ")");
}

constexpr size_t max_pass_fds = 8;

// Everything the forked child needs, prepared in the parent so that the child only
// makes async-signal-safe system calls.
struct ChildSetup {
  const char* executable = nullptr;
  char* const* argv = nullptr;
  char* const* envp = nullptr;
  int stdin_fd = -1;
  int stdout_fd = -1;
  int stderr_fd = -1;
  int error_pipe = -1;  // close-on-exec; carries a ChildFailure if anything fails before exec
  bool die_with_parent = true;
  pid_t parent_pid = -1;
  bool set_credentials = false;
  uid_t uid = 0;
  gid_t gid = 0;
  const gid_t* groups = nullptr;
  size_t group_count = 0;
  int pass_fds[max_pass_fds] = {};
  size_t pass_fd_count = 0;
};

// What the child reports through the status pipe when it cannot reach exec.
struct ChildFailure {
  int step = 0;  // ChildStep
  int error = 0;
};
enum ChildStep { step_setup = 0, step_credentials = 1, step_exec = 2 };

[[noreturn]] void child_fail(int error_pipe, int err, int step = step_setup) {
  ChildFailure failure{step, err};
  ssize_t ignored = ::write(error_pipe, &failure, sizeof failure);
  (void)ignored;
  ::_exit(127);
}

int move_to(int fd, int target) {
  if (fd == target) {
    // dup2 onto itself would keep close-on-exec set.
    int flags = ::fcntl(fd, F_GETFD);
    return flags < 0 ? -1 : ::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC);
  }
  return ::dup2(fd, target) < 0 ? -1 : 0;
}

// Runs in the child between fork and exec: async-signal-safe calls only.
[[noreturn]] void run_child(ChildSetup setup) {
  // Own session and process group: a Ctrl-C at the runner's terminal must not reach
  // the child; the runner decides how to stop it.
  if (::setsid() < 0) child_fail(setup.error_pipe, errno);
  // Groups and gid while still root, uid last. Before PR_SET_PDEATHSIG: a change of
  // the effective uid clears the parent-death signal.
  if (setup.set_credentials &&
      (::setgroups(setup.group_count, setup.groups) != 0 || ::setgid(setup.gid) != 0 ||
       ::setuid(setup.uid) != 0))
    child_fail(setup.error_pipe, errno, step_credentials);
  if (setup.die_with_parent) {
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) child_fail(setup.error_pipe, errno);
    // The parent may have died before prctl took effect.
    if (::getppid() != setup.parent_pid) ::_exit(127);
  }
  // Default dispositions and an empty mask (the spawner thread blocks everything;
  // an ignored SIGPIPE would otherwise be inherited across exec).
  struct sigaction default_action {};
  default_action.sa_handler = SIG_DFL;
  for (int sig = 1; sig < NSIG; ++sig) ::sigaction(sig, &default_action, nullptr);
  sigset_t empty;
  sigemptyset(&empty);
  ::sigprocmask(SIG_SETMASK, &empty, nullptr);

  // Passed descriptors and the status pipe first go above every target (0-2 and
  // 3..3+n-1), so that no dup2 below overwrites one still to be moved.
  const int above_targets = 3 + static_cast<int>(setup.pass_fd_count);
  if (setup.error_pipe < above_targets) {
    int moved = ::fcntl(setup.error_pipe, F_DUPFD_CLOEXEC, above_targets);
    if (moved < 0) child_fail(setup.error_pipe, errno);
    setup.error_pipe = moved;
  }
  for (size_t i = 0; i < setup.pass_fd_count; ++i) {
    setup.pass_fds[i] = ::fcntl(setup.pass_fds[i], F_DUPFD_CLOEXEC, above_targets);
    if (setup.pass_fds[i] < 0) child_fail(setup.error_pipe, errno);
  }
  if (move_to(setup.stdin_fd, STDIN_FILENO) != 0 || move_to(setup.stdout_fd, STDOUT_FILENO) != 0 ||
      move_to(setup.stderr_fd, STDERR_FILENO) != 0)
    child_fail(setup.error_pipe, errno);
  // Any descriptor another thread opened without O_CLOEXEC must not leak into the child.
#ifdef SYS_close_range
  if (::syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */) != 0)
#endif
  {
    for (int fd = 3; fd < 4096; ++fd) {
      if (fd != setup.error_pipe) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
  }
  for (size_t i = 0; i < setup.pass_fd_count; ++i) {  // dup2 leaves the copy open across exec
    if (::dup2(setup.pass_fds[i], 3 + static_cast<int>(i)) < 0) child_fail(setup.error_pipe, errno);
  }
  ::execve(setup.executable, setup.argv, setup.envp);
  child_fail(setup.error_pipe, errno, step_exec);
}

// One thread, alive for the life of the process, does every fork. PR_SET_PDEATHSIG
// fires when the *thread* that forked exits, so forking from short-lived threads
// would kill children early; forking here ties them to the process instead.
class Spawner {
 public:
  static Spawner& instance() {
    static std::mutex creation_mutex;
    static Spawner* current = nullptr;
    std::lock_guard lock(creation_mutex);
    // After fork() the thread is gone from the new process: start a fresh one
    // (the old object is deliberately leaked; its mutex may be in any state).
    if (current == nullptr || current->owner_pid_ != ::getpid()) current = new Spawner();
    return *current;
  }

  // Forks on the spawner thread; returns the pid or -errno.
  pid_t fork_child(const ChildSetup& setup) {
    Request request{&setup, {}};
    std::future<pid_t> result = request.done.get_future();
    {
      std::lock_guard lock(mutex_);
      queue_.push_back(&request);
    }
    wakeup_.notify_one();
    return result.get();
  }

 private:
  struct Request {
    const ChildSetup* setup;
    std::promise<pid_t> done;
  };

  Spawner() : owner_pid_(::getpid()) {
    // Block every signal on the spawner thread so process-directed signals go to
    // the runner's own threads; children reset their mask before exec.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    std::thread(&Spawner::run, this).detach();
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
  }

  [[noreturn]] void run() {
    for (;;) {
      Request* request;
      {
        std::unique_lock lock(mutex_);
        wakeup_.wait(lock, [this] { return !queue_.empty(); });
        request = queue_.front();
        queue_.pop_front();
      }
      pid_t pid = ::fork();
      if (pid == 0) run_child(*request->setup);
      request->done.set_value(pid < 0 ? -errno : pid);
    }
  }

  pid_t owner_pid_;
  std::mutex mutex_;
  std::condition_variable wakeup_;
  std::deque<Request*> queue_;
};

ExitStatus decode_wait_status(int status) {
  ExitStatus result;
  if (WIFSIGNALED(status)) {
    result.signaled = true;
    result.signal = WTERMSIG(status);
  } else {
    result.code = WEXITSTATUS(status);
  }
  return result;
}

Result<void> make_capture_pipe(bool capture, const std::string& stream, FdGuard& read_end,
                               FdGuard& write_end) {
  if (!capture) {
    write_end.fd = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (write_end.fd < 0) return fail(errno_message("cannot open /dev/null for " + stream, errno));
    return {};
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0)
    return fail(errno_message("cannot create the " + stream + " pipe", errno));
  read_end.fd = fds[0];
  write_end.fd = fds[1];
  int flags = ::fcntl(read_end.fd, F_GETFL);
  if (flags < 0 || ::fcntl(read_end.fd, F_SETFL, flags | O_NONBLOCK) != 0)
    return fail(errno_message("cannot make the " + stream + " pipe non-blocking", errno));
  return {};
}

}  // namespace

Result<ChildProcess> ChildProcess::spawn(const std::vector<std::string>& argv,
                                         const SpawnOptions& options) {
  if (argv.empty()) return fail("cannot spawn a process: empty command line");
  if (options.pass_fds.size() > max_pass_fds)
    return fail("cannot spawn " + argv[0] + ": " + std::to_string(options.pass_fds.size()) +
                " descriptors to pass, at most " + std::to_string(max_pass_fds));
  auto executable = resolve_executable(argv[0]);
  if (!executable) return tl::unexpected(executable.error());

  std::vector<char*> child_argv;
  for (const std::string& arg : argv) child_argv.push_back(const_cast<char*>(arg.c_str()));
  child_argv.push_back(nullptr);

  FdGuard stdin_null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  if (stdin_null.fd < 0) return fail(errno_message("cannot open /dev/null for stdin", errno));
  FdGuard stdout_read, stdout_write, stderr_read, stderr_write;
  if (auto made = make_capture_pipe(options.capture_stdout, "stdout", stdout_read, stdout_write); !made)
    return tl::unexpected(made.error());
  if (auto made = make_capture_pipe(options.capture_stderr, "stderr", stderr_read, stderr_write); !made)
    return tl::unexpected(made.error());
  int error_fds[2];
  if (::pipe2(error_fds, O_CLOEXEC) != 0)
    return fail(errno_message("cannot create the exec status pipe", errno));
  FdGuard error_read(error_fds[0]), error_write(error_fds[1]);

  ChildSetup setup;
  setup.executable = executable->c_str();
  setup.argv = child_argv.data();
  setup.envp = environ;
  setup.stdin_fd = stdin_null.fd;
  setup.stdout_fd = stdout_write.fd;
  setup.stderr_fd = stderr_write.fd;
  setup.error_pipe = error_write.fd;
  setup.die_with_parent = options.die_with_parent;
  setup.parent_pid = ::getpid();
  if (options.run_as) {
    setup.set_credentials = true;
    setup.uid = options.run_as->uid;
    setup.gid = options.run_as->gid;
    setup.groups = options.run_as->groups.data();
    setup.group_count = options.run_as->groups.size();
  }
  for (int fd : options.pass_fds) setup.pass_fds[setup.pass_fd_count++] = fd;

  pid_t pid;
  try {
    pid = Spawner::instance().fork_child(setup);
  } catch (const std::system_error& error) {  // the spawner thread could not be started
    return fail("cannot spawn " + argv[0] + ": " + error.what());
  }
  if (pid < 0) return fail(errno_message("cannot fork to run " + argv[0], -pid));

  ChildProcess child;  // from here on, every failure path reaps it in the destructor
  child.pid_ = pid;
  child.pidfd_ = pidfd_open(pid);  // the child is not reaped yet, so the pid is still its own
  child.stdout_fd_ = stdout_read.release();
  child.stderr_fd_ = stderr_read.release();
  // Only the child holds the write ends now; EOF on the status pipe means exec worked.
  close_fd(error_write.fd);
  close_fd(stdout_write.fd);
  close_fd(stderr_write.fd);
  close_fd(stdin_null.fd);

  ChildFailure failure;
  size_t received = 0;
  for (;;) {
    pollfd waiting{error_read.fd, POLLIN, 0};
    // The child only makes a handful of system calls before exec; 10 s is generous.
    int ready = ::poll(&waiting, 1, 10000);
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) return fail("cannot spawn " + argv[0] + ": the child did not reach exec within 10 s");
    ssize_t n = ::read(error_read.fd, reinterpret_cast<char*>(&failure) + received,
                       sizeof failure - received);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    received += static_cast<size_t>(n);
    if (received == sizeof failure) break;
  }
  if (received == sizeof failure) {
    const std::string as_user = options.run_as ? " as uid " + std::to_string(options.run_as->uid) +
                                                   ", gid " + std::to_string(options.run_as->gid)
                                               : "";
    if (failure.step == step_credentials)
      return fail(errno_message("cannot switch to uid/gid to run " + *executable + as_user, failure.error));
    if (failure.step == step_exec)
      return fail(errno_message("cannot execute " + *executable + as_user, failure.error));
    return fail(errno_message("cannot spawn " + argv[0] + ": setting up the child failed", failure.error));
  }
  if (received != 0) return fail("cannot spawn " + argv[0] + ": garbled exec status from the child");
  return child;
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(other.pid_),
      stdout_fd_(other.stdout_fd_),
      stderr_fd_(other.stderr_fd_),
      pidfd_(other.pidfd_),
      status_(other.status_) {
  other.pid_ = -1;
  other.stdout_fd_ = other.stderr_fd_ = other.pidfd_ = -1;
  other.status_.reset();
}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    // The child this object held (if any) ends up in `previous` and is reaped there.
    ChildProcess previous(std::move(*this));
    pid_ = std::exchange(other.pid_, -1);
    stdout_fd_ = std::exchange(other.stdout_fd_, -1);
    stderr_fd_ = std::exchange(other.stderr_fd_, -1);
    pidfd_ = std::exchange(other.pidfd_, -1);
    status_ = std::exchange(other.status_, std::nullopt);
  }
  return *this;
}

ChildProcess::~ChildProcess() {
  if (pid_ > 0 && !status_) {
    kill(SIGKILL);
    int status;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  close_fds();
}

void ChildProcess::close_fds() {
  close_fd(stdout_fd_);
  close_fd(stderr_fd_);
  close_fd(pidfd_);
}

std::optional<ExitStatus> ChildProcess::try_wait() {
  if (status_ || pid_ <= 0) return status_;
  int status = 0;
  pid_t reaped;
  do {
    reaped = ::waitpid(pid_, &status, WNOHANG);
  } while (reaped < 0 && errno == EINTR);
  if (reaped == pid_) {
    status_ = decode_wait_status(status);
  } else if (reaped < 0 && errno == ECHILD) {
    // Someone else reaped it (e.g. SIGCHLD set to SIG_IGN): gone, status unknown.
    status_ = ExitStatus{false, -1, 0};
  }
  return status_;
}

std::optional<ExitStatus> ChildProcess::wait_for(std::chrono::milliseconds timeout) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + timeout;
  for (;;) {
    if (auto status = try_wait()) return status;
    if (pid_ <= 0) return std::nullopt;
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    if (remaining.count() <= 0) return std::nullopt;
    if (pidfd_ >= 0) {
      pollfd exit_poll{pidfd_, POLLIN, 0};
      int wait_ms = static_cast<int>(std::min<long long>(remaining.count() + 1, INT_MAX));
      ::poll(&exit_poll, 1, wait_ms);
    } else {
      std::this_thread::sleep_for(std::min(remaining, std::chrono::milliseconds(10)));
    }
  }
}

bool ChildProcess::running() { return pid_ > 0 && !try_wait(); }

void ChildProcess::kill(int signal) {
  // Not yet reaped, so the pid cannot have been reused.
  if (pid_ <= 0 || status_) return;
  if (pidfd_ >= 0 && pidfd_send_signal(pidfd_, signal) == 0) return;
  ::kill(pid_, signal);
}

}  // namespace solstice
