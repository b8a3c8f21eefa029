#include "runtime/vm/recovery.hpp"

#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <iterator>
#include <optional>
#include <thread>

#include <google/protobuf/util/json_util.h>
#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/base/proc_stat.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

namespace {

// ------------------------------------------------------------ processes

// The same process that was recorded: running, with the recorded start time.
bool same_process_running(pid_t pid, unsigned long long start_time) {
  return process_running(pid) && process_start_time(pid) == start_time;
}

std::vector<std::string> process_arguments(pid_t pid) {
  std::ifstream file("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string raw((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  size_t start = 0;
  while (start < raw.size()) {
    auto end = raw.find('\0', start);
    if (end == std::string::npos)
      end = raw.size();
    args.push_back(raw.substr(start, end - start));
    start = end + 1;
  }
  return args;
}

// True when an argument is `dir` itself or names something inside it (QEMU's
// arguments carry the QMP socket, overlay and seed paths of its work directory).
bool arguments_mention(const std::vector<std::string>& args, const std::string& dir) {
  if (dir.empty())
    return false;
  for (const auto& arg : args)
    if (arg == dir || arg.find(dir + "/") != std::string::npos)
      return true;
  return false;
}

int open_pidfd(pid_t pid) {
#ifdef SYS_pidfd_open
  return static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
#else
  (void)pid;
  errno = ENOSYS;
  return -1;
#endif
}

bool send_signal(int pidfd, pid_t pid, int signal) {
#ifdef SYS_pidfd_send_signal
  if (pidfd >= 0)
    return ::syscall(SYS_pidfd_send_signal, pidfd, signal, nullptr, 0) == 0;
#endif
  (void)pidfd;
  return ::kill(pid, signal) == 0;
}

enum class KillOutcome { not_ours, killed, still_running };

// Kills the QEMU of an abandoned VM if it is still there. It is recognised by PID,
// start time and a command line that mentions one of `dirs`; the checks run on a
// pidfd, so the signal cannot reach a process that took the PID in between.
KillOutcome kill_surviving_qemu(pid_t pid, unsigned long long start_time,
                                const std::vector<std::string>& dirs,
                                std::chrono::milliseconds wait) {
  if (pid <= 0)
    return KillOutcome::not_ours;
  int pidfd = open_pidfd(pid);
  bool ours = same_process_running(pid, start_time);
  if (ours) {
    auto args = process_arguments(pid);
    ours = false;
    for (const auto& dir : dirs)
      ours |= arguments_mention(args, dir);
  }
  if (!ours || !send_signal(pidfd, pid, SIGKILL)) {
    if (pidfd >= 0)
      ::close(pidfd);
    return KillOutcome::not_ours;
  }
  auto deadline = std::chrono::steady_clock::now() + wait;
  bool gone = false;
  while (!gone && std::chrono::steady_clock::now() < deadline) {
    if (pidfd >= 0) {
      pollfd exit_poll{pidfd, POLLIN, 0};
      gone = ::poll(&exit_poll, 1, 20) > 0;
    } else {
      gone = !process_running(pid);
      if (!gone)
        std::this_thread::sleep_for(20ms);
    }
  }
  // If it happens to be our own child (a runner recovering in the same process, or
  // a test), reap it; for anyone else's this is a harmless ECHILD.
  if (gone)
    ::waitpid(pid, nullptr, WNOHANG);
  if (pidfd >= 0)
    ::close(pidfd);
  return gone ? KillOutcome::killed : KillOutcome::still_running;
}

// ------------------------------------------------------------ files

Result<void> write_private_file(const fs::path& path, const std::string& text) {
  auto tmp = path.string() + ".tmp";
  // A new file of our own: the work directory is shared with QEMU's user, whose own
  // file of this name must not become the record after the rename.
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return fail(errno_message("cannot create " + tmp, errno));
  size_t written = 0;
  while (written < text.size()) {
    auto n = ::write(fd, text.data() + written, text.size() - written);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return fail(errno_message("cannot write " + tmp, err));
    }
    written += static_cast<size_t>(n);
  }
  bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced || ::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return fail(errno_message("cannot write " + path.string(), err));
  }
  return {};
}

// The newest modification time of `dir` and the entries directly in it.
fs::file_time_type newest_change(const fs::path& dir) {
  std::error_code ec;
  auto newest = fs::last_write_time(dir, ec);
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code entry_ec;
    auto changed = fs::symlink_status(it->path(), entry_ec).type() == fs::file_type::symlink
                     ? newest
                     : fs::last_write_time(it->path(), entry_ec);
    if (!entry_ec && changed > newest)
      newest = changed;
  }
  return newest;
}

struct EventLogSummary {
  uint64_t last_sequence = 0;
  std::optional<v1::JobResult> result;
  bool ends_with_newline = true;
};

// Reads what there is of an event log, tolerating a damaged line (the runner may
// have died while writing it).
EventLogSummary summarize_event_log(const fs::path& path) {
  EventLogSummary summary;
  std::ifstream file(path, std::ios::binary);
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  summary.ends_with_newline = text.empty() || text.back() == '\n';
  size_t start = 0;
  while (start < text.size()) {
    auto end = text.find('\n', start);
    if (end == std::string::npos)
      end = text.size();
    if (end > start) {
      if (auto event = event_from_json_line(std::string_view(text).substr(start, end - start))) {
        if (event->sequence() != UINT64_MAX && event->sequence() > summary.last_sequence)
          summary.last_sequence = event->sequence();
        if (event->has_result())
          summary.result = event->result();
      }
    }
    start = end + 1;
  }
  return summary;
}

Result<void> write_result_file(const fs::path& job_dir, const v1::JobResult& result) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(result, &json, options).ok())
    return fail("cannot encode the result of job " + result.job_id());
  return write_private_file(job_dir / "result.json", json);
}

// Records an abandoned job as an infrastructure error, unless it already has a
// result. Returns whether a result was written.
Result<bool> record_abandoned_job(const fs::path& job_dir, const std::string& job_id,
                                  bool qemu_killed) {
  std::error_code ec;
  if (!fs::is_directory(job_dir, ec))
    return false;
  auto events_path = job_dir / "events.jsonl";
  auto summary = summarize_event_log(events_path);
  if (summary.result) {
    // Finished before its runner died (during the tear-down): keep that result.
    if (!fs::exists(job_dir / "result.json", ec))
      if (auto ok = write_result_file(job_dir, *summary.result); !ok)
        return tl::unexpected(ok.error());
    return false;
  }
  if (!summary.ends_with_newline) {
    // End the damaged last line so the new events start on their own.
    int fd = ::open(events_path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW);
    if (fd >= 0) {
      (void)!::write(fd, "\n", 1);
      ::close(fd);
    }
  }
  auto log = EventLog::open(events_path);
  if (!log)
    return tl::unexpected(log.error());

  v1::JobEvent error_event;
  error_event.set_job_id(job_id);
  error_event.set_sequence(summary.last_sequence + 1);
  error_event.set_timestamp_us(unix_now_us());
  error_event.mutable_error()->set_message(abandoned_job_error);
  if (auto ok = log->append(error_event); !ok)
    return tl::unexpected(ok.error());

  v1::JobEvent result_event;
  result_event.set_job_id(job_id);
  result_event.set_sequence(summary.last_sequence + 2);
  result_event.set_timestamp_us(unix_now_us());
  auto* result = result_event.mutable_result();
  result->set_job_id(job_id);
  result->set_status(v1::INFRASTRUCTURE_ERROR);
  result->set_exit_code(125);
  result->set_error(abandoned_job_error);
  result->set_shutdown_method(qemu_killed ? "kill" : "exited");
  result->set_summary("job " + job_id + " infrastructure_error — " + abandoned_job_error);
  if (auto ok = log->append(result_event); !ok)
    return tl::unexpected(ok.error());
  if (auto ok = write_result_file(job_dir, *result); !ok)
    return tl::unexpected(ok.error());
  return true;
}

// Serialises recoveries of runners sharing a state directory; runners that are
// not recovering never take it. nullopt when another runner holds it for long.
class RecoveryLock {
 public:
  static std::optional<RecoveryLock> take(const fs::path& run_dir) {
    int fd = ::open(run_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
      return std::nullopt;
    auto deadline = std::chrono::steady_clock::now() + 15s;
    while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      if ((errno != EWOULDBLOCK && errno != EINTR) || std::chrono::steady_clock::now() > deadline) {
        ::close(fd);
        return std::nullopt;
      }
      std::this_thread::sleep_for(50ms);
    }
    return RecoveryLock(fd);
  }
  RecoveryLock(RecoveryLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  RecoveryLock& operator=(RecoveryLock&&) = delete;
  ~RecoveryLock() {
    if (fd_ >= 0)
      ::close(fd_);  // releases the lock
  }

 private:
  explicit RecoveryLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

std::optional<RecoveredJob> recover_entry(const v1::RunnerConfig& config, const fs::path& entry,
                                          const RecoveryOptions& options) {
  RecoveredJob job;
  job.job_id = entry.filename().string();
  job.work_dir = entry;
  std::string done;  // what was done, for the description

  std::error_code ec;
  auto record = read_owner_record(entry);
  if (record) {
    if (same_process_running(record->runner_pid, record->runner_start_time))
      return std::nullopt;  // its runner is alive and still using it
    job.runner_pid = record->runner_pid;
    std::vector<std::string> dirs{entry.string()};
    if (!record->work_dir.empty() && record->work_dir != entry.string())
      dirs.push_back(record->work_dir);
    switch (kill_surviving_qemu(record->qemu_pid, record->qemu_start_time, dirs,
                                options.kill_wait)) {
      case KillOutcome::killed:
        job.qemu_pid = record->qemu_pid;
        job.qemu_killed = true;
        done += "killed its QEMU (pid " + std::to_string(record->qemu_pid) + "), ";
        break;
      case KillOutcome::still_running:
        job.qemu_pid = record->qemu_pid;
        done += "sent SIGKILL to its QEMU (pid " + std::to_string(record->qemu_pid) +
                ") but it has not exited yet, ";
        break;
      case KillOutcome::not_ours:
        break;
    }
  } else {
    // No (readable) owner record: the runner died while preparing the VM — or a
    // runner is preparing it right now, so leave young entries alone.
    auto age = fs::file_time_type::clock::now() - newest_change(entry);
    if (age < options.unowned_grace)
      return std::nullopt;
  }

  fs::remove_all(entry, ec);
  if (ec)
    done += "could not remove " + entry.string() + " (" + ec.message() + "), ";
  else
    done += "removed " + entry.string() + ", ";

  auto recorded = record_abandoned_job(job_dir_for(config, job.job_id), job.job_id,
                                       job.qemu_killed);
  if (!recorded)
    done += "could not record its result: " + recorded.error().message;
  else if (*recorded) {
    job.result_recorded = true;
    done += "recorded it as infrastructure_error";
  } else {
    done += "its result was already recorded";
  }
  job.description = "job " + job.job_id + " was left by a runner that stopped" +
                    (job.runner_pid ? " (pid " + std::to_string(job.runner_pid) + ")" : "") +
                    ": " + done;
  return job;
}

}  // namespace

// ------------------------------------------------------------ owner records

OwnerRecord owner_record_for(const v1::VmHandle& handle) {
  OwnerRecord record;
  record.runner_pid = ::getpid();
  record.runner_start_time = process_start_time(record.runner_pid).value_or(0);
  record.qemu_pid = handle.qemu_pid();
  record.qemu_start_time = handle.qemu_start_time();
  record.job_id = handle.job_id();
  record.job_dir = handle.job_dir();
  record.work_dir = handle.work_dir();
  return record;
}

Result<void> write_owner_record(const fs::path& work_dir, const OwnerRecord& record) {
  nlohmann::json json = {
    {"runner_pid", record.runner_pid},       {"runner_start_time", record.runner_start_time},
    {"qemu_pid", record.qemu_pid},           {"qemu_start_time", record.qemu_start_time},
    {"job_id", record.job_id},               {"job_dir", record.job_dir},
    {"work_dir", record.work_dir},
  };
  return write_private_file(work_dir / owner_record_file, json.dump(2) + "\n");
}

Result<OwnerRecord> read_owner_record(const fs::path& work_dir) {
  auto path = work_dir / owner_record_file;
  std::ifstream file(path);
  if (!file)
    return fail("cannot read " + path.string());
  auto json = nlohmann::json::parse(file, nullptr, false);
  if (json.is_discarded() || !json.is_object())
    return fail(path.string() + " is not a JSON object");
  try {
    OwnerRecord record;
    record.runner_pid = json.at("runner_pid").get<pid_t>();
    record.runner_start_time = json.at("runner_start_time").get<unsigned long long>();
    record.qemu_pid = json.value("qemu_pid", pid_t{0});
    record.qemu_start_time = json.value("qemu_start_time", 0ULL);
    record.job_id = json.value("job_id", std::string{});
    record.job_dir = json.value("job_dir", std::string{});
    record.work_dir = json.value("work_dir", std::string{});
    return record;
  } catch (const nlohmann::json::exception& e) {
    return fail(path.string() + ": " + e.what());
  }
}

void remove_owner_record(const fs::path& work_dir) {
  ::unlink((work_dir / owner_record_file).c_str());
}

// ------------------------------------------------------------ recovery

Result<std::vector<RecoveredJob>> recover_abandoned_jobs(const v1::RunnerConfig& config,
                                                          const RecoveryOptions& options) {
  std::vector<RecoveredJob> recovered;
  if (config.state_dir().empty())
    return recovered;
  auto run_dir = fs::path(config.state_dir()) / "run";
  std::error_code ec;
  if (!fs::exists(run_dir, ec))
    return recovered;
  if (!fs::is_directory(run_dir, ec))
    return fail(run_dir.string() + " is not a directory");
  auto lock = RecoveryLock::take(run_dir);
  if (!lock)
    return recovered;  // another runner is recovering this state directory

  std::vector<fs::path> entries;
  fs::directory_iterator it(run_dir, ec);
  if (ec)
    return fail("cannot read " + run_dir.string() + ": " + ec.message());
  for (fs::directory_iterator end; it != end; it.increment(ec)) {
    if (ec)
      return fail("cannot read " + run_dir.string() + ": " + ec.message());
    auto name = it->path().filename().string();
    std::error_code type_ec;
    if (name.empty() || name[0] == '.' ||
        fs::symlink_status(it->path(), type_ec).type() != fs::file_type::directory)
      continue;
    entries.push_back(it->path());
  }
  for (const auto& entry : entries)
    if (auto job = recover_entry(config, entry, options))
      recovered.push_back(std::move(*job));
  return recovered;
}

}  // namespace solstice
