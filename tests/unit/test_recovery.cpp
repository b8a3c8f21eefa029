#include <doctest/doctest.h>

#include <spawn.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/base/proc_stat.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/vm/recovery.hpp"
#include "runtime/vm/vm_prepare.hpp"
#include "tests/unit/temp_dir.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using solstice::OwnerRecord;

extern char** environ;

namespace {

struct TempDir : solstice::test::TempDir {
  TempDir() : solstice::test::TempDir("solstice-recovery-") {}
};

// A process standing in for a QEMU: `tail -F PATH...` (it runs until killed, also
// when the paths do not exist) started with argv[0] "qemu-system-x86_64", so its
// command line names the paths as QEMU's names its socket and disks. Held by a
// pidfd, so ending it at the end of the test can never hit a process that reused
// its PID.
class FakeQemu {
 public:
  explicit FakeQemu(const std::vector<std::string>& paths) {
    std::vector<std::string> args{"qemu-system-x86_64", "-F", "-s", "60"};
    args.insert(args.end(), paths.begin(), paths.end());
    std::vector<char*> argv;
    for (auto& arg : args)
      argv.push_back(arg.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t quiet;
    posix_spawn_file_actions_init(&quiet);
    posix_spawn_file_actions_addopen(&quiet, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&quiet, 2, "/dev/null", O_WRONLY, 0);
    int spawned = ::posix_spawnp(&pid_, "tail", &quiet, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&quiet);
    REQUIRE(spawned == 0);
    pidfd_ = static_cast<int>(::syscall(SYS_pidfd_open, pid_, 0));
    REQUIRE(pidfd_ >= 0);
    // posix_spawn returns once the child has exec'd: its command line is the tail's.
    start_time_ = solstice::process_start_time(pid_).value_or(0);
    REQUIRE(start_time_ != 0);
    std::this_thread::sleep_for(50ms);
    REQUIRE(running());
  }
  FakeQemu(const FakeQemu&) = delete;
  FakeQemu& operator=(const FakeQemu&) = delete;
  ~FakeQemu() {
    ::syscall(SYS_pidfd_send_signal, pidfd_, SIGKILL, nullptr, 0);
    ::waitpid(pid_, nullptr, 0);  // ECHILD when recovery reaped it already
    ::close(pidfd_);
  }
  pid_t pid() const { return pid_; }
  unsigned long long start_time() const { return start_time_; }
  // Still there (not even a zombie: recovery reaps the children it kills).
  bool exists() const { return fs::exists("/proc/" + std::to_string(pid_)); }
  bool running() const {
    std::ifstream stat("/proc/" + std::to_string(pid_) + "/stat");
    std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
    auto end = text.rfind(')');
    return end != std::string::npos && end + 2 < text.size() && text[end + 2] != 'Z';
  }

 private:
  pid_t pid_ = -1;
  int pidfd_ = -1;
  unsigned long long start_time_ = 0;
};

// A runner that has died: the PID and start time of a process that has exited.
OwnerRecord dead_runner() {
  auto child = solstice::ChildProcess::spawn({"true"});
  REQUIRE(child);
  OwnerRecord record;
  record.runner_pid = child->pid();
  record.runner_start_time = solstice::process_start_time(child->pid()).value_or(1);
  REQUIRE(child->wait_for(10s));
  return record;
}

// A state directory with a job record (events so far) and a VM work directory.
struct Leftover {
  TempDir state;
  v1::RunnerConfig config;
  std::string job_id = "20260101-000000-abcdef";
  fs::path job_dir, work_dir;

  Leftover() {
    config.set_state_dir(state.path.string());
    job_dir = solstice::job_dir_for(config, job_id);
    work_dir = solstice::work_dir_for(config, job_id);
    REQUIRE(solstice::make_private_dir(job_dir));
    REQUIRE(solstice::make_private_dir(work_dir));
    std::ofstream(work_dir / "overlay.qcow2") << "overlay";
    std::ofstream(work_dir / "qmp.sock") << "";
    auto log = solstice::EventLog::open(job_dir / "events.jsonl");
    REQUIRE(log);
    for (uint64_t seq = 0; seq < 3; ++seq) {
      v1::JobEvent event;
      event.set_job_id(job_id);
      event.set_sequence(seq);
      event.mutable_state()->set_state(seq == 2 ? v1::RUNNING : v1::PREPARING);
      REQUIRE(log->append(event));
    }
  }

  OwnerRecord owner(const OwnerRecord& runner, pid_t qemu_pid = 0,
                    unsigned long long qemu_start = 0) const {
    OwnerRecord record = runner;
    record.qemu_pid = qemu_pid;
    record.qemu_start_time = qemu_start;
    record.job_id = job_id;
    record.job_dir = job_dir.string();
    record.work_dir = work_dir.string();
    return record;
  }

  v1::JobResult result_file() const {
    std::ifstream file(job_dir / "result.json");
    auto json = nlohmann::json::parse(file, nullptr, false);
    REQUIRE_FALSE(json.is_discarded());
    v1::JobResult result;
    result.set_job_id(json.value("job_id", ""));
    v1::JobStatus status{};
    REQUIRE(v1::JobStatus_Parse(json.value("status", ""), &status));
    result.set_status(status);
    result.set_error(json.value("error", ""));
    return result;
  }
};

void age_directory(const fs::path& dir, std::chrono::seconds by) {
  auto past = fs::file_time_type::clock::now() - by;
  for (const auto& entry : fs::directory_iterator(dir))
    fs::last_write_time(entry.path(), past);
  fs::last_write_time(dir, past);
}

}  // namespace

TEST_CASE("owner record: written private and read back") {
  TempDir dir;
  OwnerRecord record;
  record.runner_pid = 1234;
  record.runner_start_time = 987654321;
  record.qemu_pid = 5678;
  record.qemu_start_time = 123456789012ULL;
  record.job_id = "job-1";
  record.job_dir = "/state/jobs/job-1";
  record.work_dir = "/state/run/job-1";
  REQUIRE(solstice::write_owner_record(dir.path, record));
  struct stat st {};
  REQUIRE(::stat((dir.path / "owner.json").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK_FALSE(fs::exists(dir.path / "owner.json.tmp"));

  auto back = solstice::read_owner_record(dir.path);
  REQUIRE(back);
  CHECK(back->runner_pid == 1234);
  CHECK(back->runner_start_time == 987654321);
  CHECK(back->qemu_pid == 5678);
  CHECK(back->qemu_start_time == 123456789012ULL);
  CHECK(back->job_id == "job-1");
  CHECK(back->job_dir == "/state/jobs/job-1");
  CHECK(back->work_dir == "/state/run/job-1");

  solstice::remove_owner_record(dir.path);
  auto missing = solstice::read_owner_record(dir.path);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().message.find("owner.json") != std::string::npos);
}

TEST_CASE("owner record for a handle names this process as the runner") {
  v1::VmHandle handle;
  handle.set_job_id("j");
  handle.set_work_dir("/s/run/j");
  handle.set_job_dir("/s/jobs/j");
  handle.set_qemu_pid(42);
  handle.set_qemu_start_time(77);
  auto record = solstice::owner_record_for(handle);
  CHECK(record.runner_pid == ::getpid());
  CHECK(record.runner_start_time == solstice::process_start_time(::getpid()).value());
  CHECK(record.qemu_pid == 42);
  CHECK(record.qemu_start_time == 77);
  CHECK(record.work_dir == "/s/run/j");
}

TEST_CASE("a damaged owner record is an error naming the file") {
  TempDir dir;
  std::ofstream(dir.path / "owner.json") << "{\"runner_pid\": ";
  auto record = solstice::read_owner_record(dir.path);
  REQUIRE_FALSE(record);
  CHECK(record.error().message.find((dir.path / "owner.json").string()) != std::string::npos);
}

TEST_CASE("recovery: no state directory or no run directory is nothing to do") {
  v1::RunnerConfig config;
  auto none = solstice::recover_abandoned_jobs(config);
  REQUIRE(none);
  CHECK(none->empty());
  TempDir state;
  config.set_state_dir((state.path / "missing").string());
  auto missing = solstice::recover_abandoned_jobs(config);
  REQUIRE(missing);
  CHECK(missing->empty());
}

TEST_CASE("recovery: a dead runner's surviving QEMU is killed, its files removed, the job "
          "recorded as infrastructure_error") {
  Leftover leftover;
  FakeQemu qemu({(leftover.work_dir / "qmp.sock").string()});
  REQUIRE(solstice::write_owner_record(
    leftover.work_dir, leftover.owner(dead_runner(), qemu.pid(), qemu.start_time())));

  auto recovered = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(recovered);
  REQUIRE(recovered->size() == 1);
  const auto& job = recovered->front();
  CHECK(job.job_id == leftover.job_id);
  CHECK(job.qemu_killed);
  CHECK(job.qemu_pid == qemu.pid());
  CHECK(job.result_recorded);
  CHECK(job.description.find(leftover.job_id) != std::string::npos);
  CHECK(job.description.find("killed its QEMU (pid " + std::to_string(qemu.pid())) !=
        std::string::npos);
  // Killed and reaped (it is this process's child): not even a zombie is left.
  CHECK_FALSE(qemu.exists());
  CHECK_FALSE(fs::exists(leftover.work_dir));
  CHECK(fs::exists(leftover.job_dir));

  auto result = leftover.result_file();
  CHECK(result.job_id() == leftover.job_id);
  CHECK(result.status() == v1::INFRASTRUCTURE_ERROR);
  CHECK(result.error() == solstice::abandoned_job_error);
  struct stat st {};
  REQUIRE(::stat((leftover.job_dir / "result.json").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  // The event log goes on where it stopped: an error event, then the result.
  auto events = solstice::read_event_log(leftover.job_dir / "events.jsonl");
  REQUIRE(events);
  REQUIRE(events->size() == 5);
  CHECK((*events)[3].sequence() == 3);
  CHECK((*events)[3].error().message() == solstice::abandoned_job_error);
  CHECK((*events)[4].sequence() == 4);
  REQUIRE((*events)[4].has_result());
  CHECK((*events)[4].result().status() == v1::INFRASTRUCTURE_ERROR);
  CHECK((*events)[4].result().shutdown_method() == "kill");

  // A second pass finds nothing more to do.
  auto again = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(again);
  CHECK(again->empty());
}

TEST_CASE("recovery: a QEMU that died with its runner leaves only files to clean") {
  Leftover leftover;
  auto runner = dead_runner();
  REQUIRE(solstice::write_owner_record(leftover.work_dir, leftover.owner(runner, runner.runner_pid,
                                                                         runner.runner_start_time)));
  auto recovered = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(recovered);
  REQUIRE(recovered->size() == 1);
  CHECK_FALSE(recovered->front().qemu_killed);
  CHECK(recovered->front().result_recorded);
  CHECK_FALSE(fs::exists(leftover.work_dir));
  CHECK(leftover.result_file().status() == v1::INFRASTRUCTURE_ERROR);
  auto events = solstice::read_event_log(leftover.job_dir / "events.jsonl");
  REQUIRE(events);
  CHECK(events->back().result().shutdown_method() == "exited");
}

TEST_CASE("recovery: a process that is not the recorded QEMU is never killed") {
  Leftover leftover;
  auto runner = dead_runner();

  SUBCASE("same PID, another start time (the PID was reused)") {
    FakeQemu other({leftover.work_dir.string()});
    REQUIRE(solstice::write_owner_record(
      leftover.work_dir, leftover.owner(runner, other.pid(), other.start_time() + 1)));
    auto recovered = solstice::recover_abandoned_jobs(leftover.config);
    REQUIRE(recovered);
    REQUIRE(recovered->size() == 1);
    CHECK_FALSE(recovered->front().qemu_killed);
    CHECK(other.running());
    // The files and the job are still cleaned and recorded.
    CHECK_FALSE(fs::exists(leftover.work_dir));
    CHECK(recovered->front().result_recorded);
  }
  SUBCASE("same PID and start time, but a command line about something else") {
    FakeQemu other({(leftover.state.path / "run" / "another-job").string()});
    REQUIRE(solstice::write_owner_record(
      leftover.work_dir, leftover.owner(runner, other.pid(), other.start_time())));
    auto recovered = solstice::recover_abandoned_jobs(leftover.config);
    REQUIRE(recovered);
    REQUIRE(recovered->size() == 1);
    CHECK_FALSE(recovered->front().qemu_killed);
    CHECK(other.running());
  }
  SUBCASE("a work directory that is only a prefix of the one in the command line") {
    FakeQemu other({leftover.work_dir.string() + "-2/qmp.sock"});
    REQUIRE(solstice::write_owner_record(
      leftover.work_dir, leftover.owner(runner, other.pid(), other.start_time())));
    auto recovered = solstice::recover_abandoned_jobs(leftover.config);
    REQUIRE(recovered);
    CHECK_FALSE(recovered->front().qemu_killed);
    CHECK(other.running());
  }
}

TEST_CASE("recovery: entries of a runner that is alive are left alone") {
  Leftover leftover;
  FakeQemu qemu({leftover.work_dir.string()});
  OwnerRecord alive;
  alive.runner_pid = ::getpid();
  alive.runner_start_time = solstice::process_start_time(::getpid()).value();
  REQUIRE(solstice::write_owner_record(leftover.work_dir,
                                       leftover.owner(alive, qemu.pid(), qemu.start_time())));
  auto recovered = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(recovered);
  CHECK(recovered->empty());
  CHECK(qemu.running());
  CHECK(fs::exists(leftover.work_dir / "owner.json"));
  CHECK_FALSE(fs::exists(leftover.job_dir / "result.json"));

  SUBCASE("but the same PID with another start time is a dead runner") {
    alive.runner_start_time += 1;
    REQUIRE(solstice::write_owner_record(leftover.work_dir,
                                         leftover.owner(alive, qemu.pid(), qemu.start_time())));
    auto cleaned = solstice::recover_abandoned_jobs(leftover.config);
    REQUIRE(cleaned);
    REQUIRE(cleaned->size() == 1);
    CHECK(cleaned->front().qemu_killed);
    CHECK_FALSE(qemu.exists());
    CHECK_FALSE(fs::exists(leftover.work_dir));
  }
}

TEST_CASE("recovery: a work directory without owner record is removed only once it is old") {
  Leftover leftover;
  // Young: a runner may be preparing it right now.
  auto young = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(young);
  CHECK(young->empty());
  CHECK(fs::exists(leftover.work_dir));

  age_directory(leftover.work_dir, 2min);
  auto old = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(old);
  REQUIRE(old->size() == 1);
  CHECK(old->front().runner_pid == 0);
  CHECK(old->front().result_recorded);
  CHECK_FALSE(fs::exists(leftover.work_dir));
  CHECK(leftover.result_file().status() == v1::INFRASTRUCTURE_ERROR);
}

TEST_CASE("recovery: a job that already has a result keeps it") {
  Leftover leftover;
  {
    auto log = solstice::EventLog::open(leftover.job_dir / "events.jsonl");
    REQUIRE(log);
    v1::JobEvent event;
    event.set_job_id(leftover.job_id);
    event.set_sequence(3);
    event.mutable_result()->set_job_id(leftover.job_id);
    event.mutable_result()->set_status(v1::SUCCEEDED);
    REQUIRE(log->append(event));
  }
  REQUIRE(solstice::write_owner_record(leftover.work_dir, leftover.owner(dead_runner())));
  auto recovered = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(recovered);
  REQUIRE(recovered->size() == 1);
  CHECK_FALSE(recovered->front().result_recorded);
  CHECK_FALSE(fs::exists(leftover.work_dir));
  // result.json was missing (the runner died before writing it): written from the log.
  CHECK(leftover.result_file().status() == v1::SUCCEEDED);
  auto events = solstice::read_event_log(leftover.job_dir / "events.jsonl");
  REQUIRE(events);
  CHECK(events->size() == 4);
}

TEST_CASE("recovery: a damaged last event line does not stop the job being recorded") {
  Leftover leftover;
  {
    std::ofstream log(leftover.job_dir / "events.jsonl", std::ios::app);
    log << "{\"job_id\": \"" << leftover.job_id << "\", \"seq";  // cut mid-write
  }
  REQUIRE(solstice::write_owner_record(leftover.work_dir, leftover.owner(dead_runner())));
  auto recovered = solstice::recover_abandoned_jobs(leftover.config);
  REQUIRE(recovered);
  REQUIRE(recovered->size() == 1);
  CHECK(recovered->front().result_recorded);
  CHECK(leftover.result_file().status() == v1::INFRASTRUCTURE_ERROR);
  // The new events are whole lines of their own.
  std::ifstream log(leftover.job_dir / "events.jsonl");
  std::string line, last;
  int results = 0;
  while (std::getline(log, line)) {
    last = line;
    if (auto event = solstice::event_from_json_line(line); event && event->has_result())
      ++results;
  }
  CHECK(results == 1);
  CHECK(solstice::event_from_json_line(last));
}

TEST_CASE("recovery: stray files and hidden entries in run/ are not touched") {
  TempDir state;
  v1::RunnerConfig config;
  config.set_state_dir(state.path.string());
  REQUIRE(solstice::make_private_dir(state.path / "run" / ".hidden"));
  std::ofstream(state.path / "run" / "stray-file") << "x";
  age_directory(state.path / "run", 2min);
  auto recovered = solstice::recover_abandoned_jobs(config);
  REQUIRE(recovered);
  CHECK(recovered->empty());
  CHECK(fs::exists(state.path / "run" / ".hidden"));
  CHECK(fs::exists(state.path / "run" / "stray-file"));
}
