// Bounded disk, the building blocks: the event log and the redacted console record
// stop at their caps with one marker; the config keys and their defaults; the free
// space check; prune by age and count, never a claimed (live) record.
#include <doctest/doctest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>

#include "runtime/job/disk_limits.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_prune.hpp"
#include "runtime/job/redacted_file.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/job_claim.hpp"
#include "temp_dir.hpp"

namespace {

using namespace solstice;
namespace fs = std::filesystem;

v1::JobEvent output_event(uint64_t sequence, const std::string& data) {
  v1::JobEvent event;
  event.set_job_id("j");
  event.set_sequence(sequence);
  event.mutable_output()->set_data(data);
  return event;
}

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void age(const fs::path& path, std::chrono::seconds by) {
  fs::last_write_time(path, fs::file_time_type::clock::now() - by);
}

void finished_record(const fs::path& state, const std::string& id, std::chrono::seconds old) {
  fs::create_directories(state / "jobs" / id);
  std::ofstream(state / "jobs" / id / "result.json") << "{}";
  age(state / "jobs" / id / "result.json", old);
}

}  // namespace

TEST_CASE("the event log stops output at events_max_bytes with one notice, keeps other events") {
  test::TempDir dir;
  const auto path = dir.path / "events.jsonl";
  auto log = EventLog::open(path, 4096);
  REQUIRE(log);
  for (uint64_t i = 0; i < 100; ++i) REQUIRE(log->append(output_event(i, std::string(200, 'x'))));
  v1::JobEvent result;
  result.set_sequence(100);
  result.mutable_result()->set_status(v1::SUCCEEDED);
  REQUIRE(log->append(result));

  auto events = read_event_log(path);
  REQUIRE(events);
  int notices = 0, outputs = 0;
  for (const auto& event : *events) {
    outputs += event.has_output();
    if (event.has_notice()) {
      ++notices;
      CHECK(event.notice().message().find("events_max_bytes (4096 bytes)") != std::string::npos);
    }
  }
  CHECK(notices == 1);
  CHECK(outputs > 5);
  CHECK(outputs < 100);
  CHECK(events->back().has_result());
  CHECK(fs::file_size(path) < 4096 + 1024);
}

TEST_CASE("an event log without a cap keeps everything") {
  test::TempDir dir;
  auto log = EventLog::open(dir.path / "events.jsonl");
  REQUIRE(log);
  for (uint64_t i = 0; i < 100; ++i) REQUIRE(log->append(output_event(i, std::string(200, 'x'))));
  CHECK(read_event_log(dir.path / "events.jsonl")->size() == 100);
}

TEST_CASE("the redacted console record ends at console_max_bytes with a marker line") {
  test::TempDir dir;
  const auto path = dir.path / "console.log";
  {
    auto file = RedactedFile::open(path, {"hunter2"}, 1000, "console_max_bytes");
    REQUIRE(file);
    for (int i = 0; i < 60; ++i) REQUIRE(file->append("line with hunter2 in it\n"));
  }
  const auto text = read_text(path);
  CHECK(text.find("hunter2") == std::string::npos);
  const std::string marker =
    "\n[solstice-runner: console.log truncated here: it reached console_max_bytes (1000 bytes); "
    "the rest is not kept]\n";
  REQUIRE(text.size() == 1000 + marker.size());
  CHECK(text.substr(1000) == marker);
}

TEST_CASE("disk limit keys: defaults when left out, 0 turns a bound off") {
  test::TempDir dir;
  auto defaults = disk_limits_of(v1::RunnerConfig{});
  CHECK(defaults.artifacts_max_bytes == default_artifacts_max_bytes);
  CHECK(defaults.events_max_bytes == default_events_max_bytes);
  CHECK(defaults.console_max_bytes == default_console_max_bytes);
  CHECK(defaults.min_free_bytes == default_min_free_bytes);
  auto file = dir.write("config.json", R"({"artifacts_max_bytes": 0, "events_max_bytes": "123",
                                          "console_max_bytes": 456, "min_free_bytes": 789})");
  auto config = load_runner_config(file);
  REQUIRE(config);
  auto limits = disk_limits_of(*config);
  CHECK(limits.artifacts_max_bytes == 0);
  CHECK(limits.events_max_bytes == 123);
  CHECK(limits.console_max_bytes == 456);
  CHECK(limits.min_free_bytes == 789);
}

TEST_CASE("the free space check names min_free_bytes and the state directory") {
  test::TempDir dir;
  v1::RunnerConfig config;
  config.set_state_dir((dir.path / "not-made-yet" / "state").string());  // its parent counts
  config.set_min_free_bytes(1);
  CHECK(check_free_space(config));
  config.set_min_free_bytes(uint64_t{1} << 62);
  auto refused = check_free_space(config);
  REQUIRE_FALSE(refused);
  CHECK(refused.error().message.find("min_free_bytes 4611686018427387904 bytes") != std::string::npos);
  CHECK(refused.error().message.find(config.state_dir()) != std::string::npos);
  config.set_min_free_bytes(0);
  CHECK(check_free_space(config));
}

TEST_CASE("ages for prune --older-than") {
  CHECK(*parse_age("7d") == std::chrono::hours(24 * 7));
  CHECK(*parse_age("12h") == std::chrono::hours(12));
  CHECK(*parse_age("30m") == std::chrono::minutes(30));
  CHECK(*parse_age("2w") == std::chrono::hours(24 * 14));
  for (const char* bad : {"", "d", "7", "7 d", "7days", "-1d", "9999999999d"})
    CHECK_FALSE(parse_age(bad));
}

TEST_CASE("prune removes finished records by age or count and never a claimed one") {
  test::TempDir dir;
  const auto state = dir.path;
  v1::RunnerConfig config;
  config.set_state_dir(state.string());
  auto live = JobClaim::take(config, "live", false);  // held: a running job
  REQUIRE(live);
  finished_record(state, "a-old", std::chrono::hours(24 * 10));
  finished_record(state, "b-mid", std::chrono::hours(24 * 3));
  finished_record(state, "c-new", std::chrono::hours(1));
  finished_record(state, "d-unrecovered", std::chrono::hours(24 * 30));
  fs::create_directories(state / "run" / "d-unrecovered");  // its VM files await recovery

  PruneRule dry;
  dry.older_than = std::chrono::hours(48);
  dry.dry_run = true;
  auto would = prune_job_records(state, dry);
  REQUIRE(would);
  REQUIRE(would->removed.size() == 2);
  CHECK(would->removed[0].job_id == "a-old");  // oldest first
  CHECK(would->removed[1].job_id == "b-mid");
  CHECK(fs::exists(state / "jobs" / "a-old"));

  PruneRule keep_one;
  keep_one.keep = 1;
  auto pruned = prune_job_records(state, keep_one);
  REQUIRE(pruned);
  CHECK(pruned->removed.size() == 2);
  CHECK_FALSE(fs::exists(state / "jobs" / "a-old"));
  CHECK_FALSE(fs::exists(state / "jobs" / "b-mid"));
  CHECK(fs::exists(state / "jobs" / "c-new"));
  CHECK(fs::exists(state / "jobs" / "live"));
  CHECK(fs::exists(state / "jobs" / "d-unrecovered"));
  CHECK(pruned->kept_live.size() == 2);
  // Nothing staged or moved aside is left in the state directory.
  for (const auto& entry : fs::directory_iterator(state))
    CHECK(entry.path().filename().string().rfind(".pruned-", 0) != 0);

  PruneRule neither;
  CHECK_FALSE(prune_job_records(state, neither));
}
