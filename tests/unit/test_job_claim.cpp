// Claims of job ids: a running job's id, a finished record and a stopped runner's
// VM files are refused; --replace removes a finished record; a dead claimant's
// lock is gone with it.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "runtime/vm/job_claim.hpp"
#include "runtime/vm/vm_prepare.hpp"
#include "temp_dir.hpp"

namespace {

using namespace solstice;
namespace fs = std::filesystem;
using Kind = ClaimRefusal::Kind;

v1::RunnerConfig config_in(const fs::path& state_dir) {
  v1::RunnerConfig config;
  config.set_state_dir(state_dir.string());
  return config;
}

// Nothing but jobs/ and run/ (and what the test put there) in the state directory:
// no staging directory is left behind.
size_t entries_in(const fs::path& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator(dir))
    ++n;
  return n;
}

}  // namespace

TEST_CASE("a job id is claimed once: a running job's id is refused, its record untouched") {
  test::TempDir state;
  const auto config = config_in(state.path);
  auto first = JobClaim::take(config, "job-1", false);
  REQUIRE(first);
  const auto record = job_dir_for(config, "job-1");
  CHECK((*first)->job_dir() == record);
  CHECK(fs::is_directory(record));
  CHECK((fs::status(record).permissions() & fs::perms::all) == fs::perms::owner_all);
  std::ofstream(record / "events.jsonl") << "first\n";

  for (bool replace : {false, true}) {
    auto second = JobClaim::take(config, "job-1", replace);
    REQUIRE_FALSE(second);
    CHECK(second.error().kind == Kind::live);
    CHECK(second.error().message.find("\"job-1\"") != std::string::npos);
    CHECK(second.error().message.find("running") != std::string::npos);
  }
  CHECK(fs::exists(record / "events.jsonl"));
  CHECK(entries_in(state.path) == 2);

  // Another id is independent.
  CHECK(JobClaim::take(config, "job-2", false));
}

TEST_CASE("a finished record is refused unless replaced; replacing removes the old record") {
  test::TempDir state;
  const auto config = config_in(state.path);
  const auto record = job_dir_for(config, "job-1");
  {
    auto first = JobClaim::take(config, "job-1", false);
    REQUIRE(first);
    std::ofstream(record / "events.jsonl") << "old\n";
    fs::create_directories(record / "artifacts");
    std::ofstream(record / "artifacts" / "stale.txt") << "stale\n";
  }  // the job ended: its claim is released, the record stays
  CHECK(fs::exists(record / "events.jsonl"));

  auto refused = JobClaim::take(config, "job-1", false);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().kind == Kind::finished);
  CHECK(refused.error().message.find("--replace") != std::string::npos);
  CHECK(fs::exists(record / "events.jsonl"));

  auto replaced = JobClaim::take(config, "job-1", true);
  REQUIRE(replaced);
  CHECK(fs::is_directory(record));
  CHECK(fs::is_empty(record));  // no old events, no stale artifacts
  CHECK(entries_in(state.path) == 2);
  // The new claim is live like any other.
  auto again = JobClaim::take(config, "job-1", true);
  REQUIRE_FALSE(again);
  CHECK(again.error().kind == Kind::live);
}

TEST_CASE("the claim of a runner that died is gone with it") {
  test::TempDir state;
  const auto config = config_in(state.path);
  int ready[2];
  REQUIRE(::pipe(ready) == 0);
  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    auto claim = JobClaim::take(config, "job-1", false);
    char byte = claim ? 'y' : 'n';
    (void)!::write(ready[1], &byte, 1);
    ::pause();  // killed while holding the claim
    ::_exit(0);
  }
  ::close(ready[1]);
  char byte = 0;
  REQUIRE(::read(ready[0], &byte, 1) == 1);
  ::close(ready[0]);
  REQUIRE(byte == 'y');
  auto while_alive = JobClaim::take(config, "job-1", false);
  REQUIRE_FALSE(while_alive);
  CHECK(while_alive.error().kind == Kind::live);

  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  auto after = JobClaim::take(config, "job-1", false);
  REQUIRE_FALSE(after);
  CHECK(after.error().kind == Kind::finished);
  CHECK(JobClaim::take(config, "job-1", true));
}

TEST_CASE("VM files of a stopped runner are refused and left for recovery") {
  test::TempDir state;
  const auto config = config_in(state.path);
  const auto work = work_dir_for(config, "job-1");
  fs::create_directories(work);
  std::ofstream(work / "owner.json") << "{}";

  for (bool replace : {false, true}) {
    auto refused = JobClaim::take(config, "job-1", replace);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().kind == Kind::leftover);
    CHECK(refused.error().message.find(work.string()) != std::string::npos);
  }
  CHECK(fs::exists(work / "owner.json"));
  CHECK_FALSE(fs::exists(job_dir_for(config, "job-1")));  // nothing made
  CHECK(entries_in(state.path) == 2);

  // With a finished record too: neither is touched, even with replace.
  fs::create_directories(job_dir_for(config, "job-1"));
  std::ofstream(job_dir_for(config, "job-1") / "events.jsonl") << "old\n";
  auto refused = JobClaim::take(config, "job-1", true);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().kind == Kind::leftover);
  CHECK(fs::exists(job_dir_for(config, "job-1") / "events.jsonl"));
}

TEST_CASE("a claimed record of a job that could not start is removed") {
  test::TempDir state;
  const auto config = config_in(state.path);
  auto claim = JobClaim::take(config, "job-1", false);
  REQUIRE(claim);
  (*claim)->remove_record();
  CHECK_FALSE(fs::exists(job_dir_for(config, "job-1")));
  claim->reset();
  CHECK(JobClaim::take(config, "job-1", false));
}

TEST_CASE("a state directory that cannot be written is an error naming it") {
  test::TempDir state;
  auto file = state.write("not-a-dir", "x");
  auto refused = JobClaim::take(config_in(file), "job-1", false);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().kind == Kind::failed);
  CHECK(refused.error().message.find(file.string()) != std::string::npos);
}

TEST_CASE("claiming a job keeps state_dir/run searchable for the VMs of jobs already running") {
  // A VM that is starting as QEMU's user needs o+x on state_dir and state_dir/run
  // (share_vm_files gives it); a claim for another job must not take it away.
  test::TempDir state;
  const auto config = config_in(state.path);
  auto first = JobClaim::take(config, "job-1", false);
  REQUIRE(first);
  const auto run = work_dir_for(config, "job-1").parent_path();
  REQUIRE(fs::is_directory(run));
  for (const auto& dir : {state.path, run})
    fs::permissions(dir, fs::perms::others_exec, fs::perm_options::add);
  auto second = JobClaim::take(config, "job-2", false);
  REQUIRE(second);
  for (const auto& dir : {state.path, run})
    CHECK((fs::status(dir).permissions() & fs::perms::others_exec) == fs::perms::others_exec);
}

TEST_CASE("directories the runner makes above a state dir are searchable, not listable, by others") {
  // QEMU's user must pass through them to its work directory; a state dir named
  // under a directory that does not exist yet (e.g. --state-dir /tmp/new/state) works.
  test::TempDir top;
  const auto state = top.path / "new" / "state";
  const auto config = config_in(state);
  auto claim = JobClaim::take(config, "job-1", false);
  REQUIRE(claim);
  const auto others = [](const fs::path& dir) { return fs::status(dir).permissions() & fs::perms::others_all; };
  CHECK(others(top.path / "new") == fs::perms::others_exec);
  CHECK(others(state) == fs::perms::others_exec);
  CHECK(others(job_dir_for(config, "job-1")) == fs::perms::none);
}
