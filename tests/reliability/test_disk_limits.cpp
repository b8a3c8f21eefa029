// Bounded disk (runtime/job/disk_limits.hpp), with the real runner binary and the
// real test guest: a job over artifacts_max_bytes fails naming the cap and leaves
// nothing but its record; events.jsonl and console.log stop at their caps with a
// marker; a state directory short of min_free_bytes refuses the job before anything
// is made; `prune` removes the finished records it names and keeps a running job's.
#include <doctest/doctest.h>

#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <set>

#include "runtime/vm/recovery.hpp"
#include "tests/reliability/harness.hpp"
#include "tests/reliability/qemu_wrappers.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

// Every file and directory under `root`, relative to it.
std::set<std::string> tree_of(const fs::path& root) {
  std::set<std::string> found;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::end(it); it.increment(ec))
    found.insert(fs::relative(it->path(), root).string());
  return found;
}

// A record whose job ended: result.json and events.jsonl, aged `age_seconds`.
void write_finished_record(const Sandbox& sandbox, const std::string& id, int age_seconds) {
  const auto dir = sandbox.job_dir(id);
  fs::create_directories(dir);
  for (const char* name : {"events.jsonl", "result.json"}) {
    std::ofstream(dir / name) << "{}\n";
    const auto when = fs::file_time_type::clock::now() - std::chrono::seconds(age_seconds);
    fs::last_write_time(dir / name, when);
  }
}

std::vector<std::string> prune_args(const Sandbox& sandbox, std::vector<std::string> rule) {
  std::vector<std::string> args{runner_binary().string(), "prune", "--state-dir",
                                sandbox.state().string()};
  args.insert(args.end(), rule.begin(), rule.end());
  return args;
}

Runner run_program_to_end(const std::vector<std::string>& argv) {
  auto program = Runner::start_program(argv);
  REQUIRE_MESSAGE(program.wait(60s), program.output());
  return program;
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("disk: a job over artifacts_max_bytes fails naming the cap and keeps only its record") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "artifact-cap";
  auto job = guest_job(id, {"head -c 100000 /dev/zero > /tmp/small.bin\n"
                            "head -c 3000000 /dev/zero > /tmp/big.bin\n"
                            "head -c 10 /dev/zero > /tmp/after.bin"});
  job["artifacts"] = {{{"path", "/tmp/small.bin"}}, {{"path", "/tmp/big.bin"}},
                      {{"path", "/tmp/after.bin"}}};
  auto job_file = sandbox.write_json("job.json", job);
  auto config = write_runner_config(sandbox, {{"artifacts_max_bytes", 1000000}});
  auto runner = run_to_end(sandbox.run_args(job_file, "tcg", config), 600s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::FAILED);
  CHECK(contains(result->error(), "artifacts_max_bytes 1000000 bytes"));
  CHECK(contains(result->error(), "/tmp/big.bin"));
  CHECK(result->artifacts_size() == 0);
  CHECK(contains(runner.output(), "artifacts_max_bytes"));
  // The host's disk as before the job, but for the record: no artifacts/ (neither
  // the small one before the cap nor a partial big one), nothing in run/.
  const auto left = tree_of(sandbox.state());
  INFO("left: " << nlohmann::json(std::vector<std::string>(left.begin(), left.end())).dump());
  // (slots/ holds the host's VM slot locks, made once per state directory.)
  const std::string record = "jobs/" + id;
  const std::set<std::string> allowed{"jobs", "run", "slots", record, record + "/events.jsonl",
                                      record + "/console.log", record + "/result.json",
                                      record + "/" + solstice::owner_record_file};
  for (const auto& path : left)
    CHECK_MESSAGE((allowed.count(path) || path.rfind("slots/", 0) == 0), path << " is left");
  check_nothing_left(sandbox);
}

TEST_CASE("disk: events.jsonl and console.log stop at their caps with a marker") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "log-caps";
  // 2 MiB of output, far beyond a 64 KiB event log; then a marker line after it.
  auto job_file = sandbox.write_json(
    "job.json", guest_job(id, {"head -c 2097152 /dev/zero | tr '\\0' x; echo; echo after-flood"}));
  auto config = write_runner_config(sandbox, {{"events_max_bytes", 65536}, {"console_max_bytes", 4096}});
  auto runner = run_to_end(sandbox.run_args(job_file, "tcg", config), 600s);
  REQUIRE_MESSAGE(runner.exited(), runner.output().substr(0, 4000));
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::SUCCEEDED);  // the caps bound the record, not the job
  // The live stream had every byte.
  CHECK(contains(runner.out(), "after-flood"));

  const auto events_path = sandbox.job_dir(id) / "events.jsonl";
  const auto events_size = fs::file_size(events_path);
  CHECK(events_size < 65536 + 16384);  // the cap, plus the few non-output events after it
  bool marker = false;
  for (const auto& notice : sandbox.notices(id))
    marker |= contains(notice, "events.jsonl truncated") && contains(notice, "events_max_bytes (65536 bytes)");
  CHECK(marker);
  CHECK(sandbox.result(id));  // the result event is still there (result.json aside)
  bool result_event = false;
  for (const auto& event : sandbox.events(id)) result_event |= event.has_result();
  CHECK(result_event);

  const auto console = read_text(sandbox.job_dir(id) / "console.log");
  CHECK(console.size() < 4096 + 200);
  CHECK(contains(console, "console.log truncated here: it reached console_max_bytes (4096 bytes)"));
  check_nothing_left(sandbox);
}

TEST_CASE("disk: a state directory with less than min_free_bytes free refuses the job before "
          "anything is made") {
  Sandbox sandbox;
  const std::string id = "no-room";
  auto job_file = sandbox.write_json("job.json", guest_job(id, {"true"}));
  // 4 EiB: no file system here has that much free.
  auto config = write_runner_config(sandbox, {{"min_free_bytes", "4611686018427387904"}});
  auto runner = run_to_end(sandbox.run_args(job_file, "tcg", config), 60s);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  auto status = runner.wait(1s);
  REQUIRE(status);
  CHECK(status->code == 125);
  CHECK(contains(runner.err(), "not enough free disk space"));
  CHECK(contains(runner.err(), "min_free_bytes 4611686018427387904 bytes"));
  CHECK_FALSE(fs::exists(sandbox.job_dir(id)));
  check_nothing_left(sandbox);
}

TEST_CASE("disk: prune removes the finished records it names and keeps a running job's") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  // A running job (its record claimed by its runner) ...
  const std::string live = "live-job";
  auto job_file = sandbox.write_json("job.json", guest_job(live, {"echo step-started; sleep 600"}));
  auto config = write_runner_config(sandbox, nlohmann::json::object());
  auto runner = Runner::start(sandbox.run_args(job_file, "tcg", config));
  REQUIRE_MESSAGE(runner.wait_until([&] { return contains(sandbox.step_output(live, 0), "step-started"); },
                                    300s),
                  runner.output());
  // ... and finished ones: 10 days, 3 days and 1 hour old.
  write_finished_record(sandbox, "old-10d", 10 * 86400);
  write_finished_record(sandbox, "old-3d", 3 * 86400);
  write_finished_record(sandbox, "new-1h", 3600);

  SUBCASE("--older-than") {
    auto dry = run_program_to_end(prune_args(sandbox, {"--older-than", "2d", "--dry-run"}));
    INFO(dry.output());
    CHECK(contains(dry.out(), "would remove " + sandbox.job_dir("old-10d").string()));
    CHECK(contains(dry.out(), "would remove 2 job records"));
    CHECK(fs::exists(sandbox.job_dir("old-10d")));  // a dry run removes nothing

    auto pruned = run_program_to_end(prune_args(sandbox, {"--older-than", "2d"}));
    INFO(pruned.output());
    CHECK(contains(pruned.out(), "removed " + sandbox.job_dir("old-10d").string()));
    CHECK(contains(pruned.out(), "removed " + sandbox.job_dir("old-3d").string()));
    CHECK(contains(pruned.out(), "removed 2 job records"));
    CHECK(contains(pruned.out(), "kept " + live));
    CHECK_FALSE(contains(pruned.out(), "new-1h"));
    CHECK_FALSE(fs::exists(sandbox.job_dir("old-10d")));
    CHECK_FALSE(fs::exists(sandbox.job_dir("old-3d")));
    CHECK(fs::exists(sandbox.job_dir("new-1h")));
  }
  SUBCASE("--keep 0 removes every finished record, never the running one") {
    auto pruned = run_program_to_end(prune_args(sandbox, {"--keep", "0"}));
    INFO(pruned.output());
    CHECK(contains(pruned.out(), "removed 3 job records"));
    CHECK(contains(pruned.out(), "kept " + live));
    for (const char* id : {"old-10d", "old-3d", "new-1h"}) CHECK_FALSE(fs::exists(sandbox.job_dir(id)));
  }
  SUBCASE("bad input") {
    auto both = run_program_to_end(prune_args(sandbox, {}));
    CHECK(contains(both.err(), "exactly one of --older-than AGE and --keep N"));
    auto bad_age = run_program_to_end(prune_args(sandbox, {"--older-than", "7 days"}));
    CHECK(contains(bad_age.err(), "age \"7 days\""));
    CHECK(fs::exists(sandbox.job_dir("old-10d")));
  }
  // The running job was not touched: it still runs, and its record is whole.
  CHECK_FALSE(runner.exited());
  CHECK(fs::exists(sandbox.job_dir(live) / "events.jsonl"));
  runner.signal(SIGTERM);
  auto status = runner.wait(60s);
  REQUIRE_MESSAGE(status, runner.output());
  CHECK(status->code == 130);
  CHECK(sandbox.result(live));
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
