// Job records as the `jobs` commands read them (runtime/job/job_records.hpp).
#include <doctest/doctest.h>

#include <unistd.h>

#include <functional>
#include <string>

#include "runtime/job/event_log.hpp"
#include "runtime/job/job_records.hpp"
#include "runtime/vm/recovery.hpp"
#include "tests/unit/temp_dir.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace solstice;

namespace {

std::string event_line(const std::string& job_id, uint64_t sequence,
                       const std::function<void(v1::JobEvent&)>& fill) {
  v1::JobEvent event;
  event.set_job_id(job_id);
  event.set_sequence(sequence);
  event.set_timestamp_us(1'700'000'000'000'000 + static_cast<int64_t>(sequence) * 1000);
  fill(event);
  return event_to_json_line(event) + "\n";
}

std::string started_line(const std::string& job_id, const std::string& name) {
  return event_line(job_id, 0, [&](v1::JobEvent& e) { e.mutable_job_started()->set_name(name); });
}

}  // namespace

TEST_CASE("records: running while the owner lives, abandoned when it does not, else the result") {
  test::TempDir dir("solstice-records-");
  const auto jobs = dir.path / "jobs";
  // Ended: result.json decides.
  dir.write("jobs/20250101-000001-aaaaaa/events.jsonl", started_line("a", "first"));
  dir.write("jobs/20250101-000001-aaaaaa/result.json",
            R"({"job_id": "a", "status": "FAILED", "exit_code": 3, "started_at_us": "5",
                "ended_at_us": "2000005"})");
  // Running: this process is its owner.
  dir.write("jobs/20250101-000002-bbbbbb/events.jsonl", started_line("b", "second"));
  REQUIRE(write_job_owner(jobs / "20250101-000002-bbbbbb", "b").has_value());
  // Abandoned: an owner that is gone (a PID that runs nothing).
  dir.write("jobs/20250101-000003-cccccc/events.jsonl", started_line("c", "third"));
  OwnerRecord gone;
  gone.runner_pid = 0x3ffffff;
  gone.runner_start_time = 1;
  REQUIRE(write_owner_record(jobs / "20250101-000003-cccccc", gone).has_value());

  auto records = list_job_records(dir.path);
  REQUIRE(records.has_value());
  REQUIRE(records->size() == 3);
  const auto& ended = (*records)[0];  // oldest first: start 5 us
  CHECK(ended.job_id == "20250101-000001-aaaaaa");
  CHECK(ended.state == "failed");
  CHECK(ended.started->name() == "first");
  CHECK(ended.ended_at_us == 2000005);
  CHECK((*records)[1].state == "running");
  CHECK((*records)[1].runner_pid == ::getpid());
  CHECK((*records)[2].state == "abandoned");

  CHECK(list_job_records(dir.path / "nothing-here")->empty());
}

TEST_CASE("records: found by the whole id, its unique start or end; else a clear error") {
  test::TempDir dir("solstice-records-");
  dir.write("jobs/20250101-000001-aaaaaa/events.jsonl", "");
  dir.write("jobs/20250101-000002-bbbbbb/events.jsonl", "");
  CHECK(find_job_record(dir.path, "20250101-000001-aaaaaa")->job_id == "20250101-000001-aaaaaa");
  CHECK(find_job_record(dir.path, "bbbbbb")->job_id == "20250101-000002-bbbbbb");
  CHECK(find_job_record(dir.path, "20250101-000001")->job_id == "20250101-000001-aaaaaa");
  auto several = find_job_record(dir.path, "20250101");
  REQUIRE_FALSE(several.has_value());
  CHECK(several.error().message.find("names several jobs") != std::string::npos);
  auto none = find_job_record(dir.path, "zzz");
  REQUIRE_FALSE(none.has_value());
  CHECK(none.error().message.find("no job \"zzz\"") != std::string::npos);
  CHECK_FALSE(find_job_record(dir.path, "../etc").has_value());
}

TEST_CASE("records: a cancel request is taken once") {
  test::TempDir dir("solstice-records-");
  CHECK_FALSE(take_cancel_request(dir.path));
  REQUIRE(request_cancel(dir.path).has_value());
  CHECK(take_cancel_request(dir.path));
  CHECK_FALSE(take_cancel_request(dir.path));
}

TEST_CASE("EventFollower: whole lines only, picked up as the file grows") {
  test::TempDir dir("solstice-records-");
  const auto first = started_line("j", "job");
  const auto second = event_line("j", 1, [](v1::JobEvent& e) { e.mutable_notice()->set_message("hi"); });
  const auto path = dir.write("events.jsonl", first + second.substr(0, 10));
  EventFollower follower(path);
  auto events = follower.read_new();
  REQUIRE(events.has_value());
  CHECK(events->size() == 1);
  CHECK(follower.at_end());
  dir.write("events.jsonl", first + second);  // the rest of the line arrives
  events = follower.read_new();
  REQUIRE(events.has_value());
  REQUIRE(events->size() == 1);
  CHECK((*events)[0].notice().message() == "hi");
  CHECK(follower.read_new()->empty());
}
