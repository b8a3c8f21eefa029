#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/message_differencer.h>
#include <nlohmann/json.hpp>

#include "runtime/job/event_log.hpp"
#include "tests/unit/temp_dir.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using google::protobuf::util::MessageDifferencer;
using solstice::EventLog;

namespace {

struct TempDir : solstice::test::TempDir {
  TempDir() : solstice::test::TempDir("solstice-event-log-") {}
};

std::string all_bytes() {
  std::string bytes;
  for (int i = 0; i < 256; ++i) bytes.push_back(static_cast<char>(i));
  return bytes;
}

// One event of every kind, with awkward content where content can be awkward.
std::vector<v1::JobEvent> one_of_each_kind() {
  std::vector<v1::JobEvent> events;
  auto next = [&]() -> v1::JobEvent& {
    auto& event = events.emplace_back();
    event.set_v(solstice::event_format_version);  // what every written line carries
    event.set_job_id("job-1");
    event.set_sequence(events.size() - 1);
    event.set_timestamp_us(1'700'000'000'000'000 + static_cast<int64_t>(events.size()));
    return event;
  };
  auto& state = *next().mutable_state();
  state.set_state(v1::WAITING_FOR_SSH);
  state.set_detail("port 40022 \"quoted\"\n\ttab");
  next().mutable_console()->set_line(std::string("boot \xff\xfe\x00 invalid utf-8 \xc3\x28", 26));
  auto& output = *next().mutable_output();
  output.set_step_index(2);
  output.set_stream(v1::STDERR);
  output.set_sequence(18'446'744'073'709'551'615ull);
  output.set_data(all_bytes());
  auto& started = *next().mutable_step_started();
  started.set_step_index(1);
  started.set_name("build ✓ ünïcode");
  auto& finished = *next().mutable_step_finished();
  finished.set_step_index(1);
  finished.set_name("build");
  finished.set_outcome(v1::STEP_FAILED);
  finished.set_exit_code(137);
  finished.set_exit_signal("KILL");
  finished.set_duration_ms(1234);
  next().mutable_error()->set_message("qemu exited: code 1");
  next().mutable_notice()->set_message("kvm cannot boot a guest here; using tcg");
  auto& result = *next().mutable_result();
  result.set_job_id("job-1");
  result.set_status(v1::FAILED);
  result.set_exit_code(137);
  result.set_exit_signal("KILL");
  *result.add_steps() = finished;
  auto* phase = result.add_phases();
  phase->set_phase("boot_to_ssh");
  phase->set_duration_ms(4600);
  result.set_summary("step build killed by SIGKILL");
  result.set_shutdown_method("powerdown");
  result.add_console_tail("last line");
  result.add_artifacts("result.txt");
  next();  // an event with no kind set at all
  return events;
}

}  // namespace

TEST_CASE("every event kind round-trips through the log file, bytes exactly") {
  TempDir dir;
  const fs::path file = dir.path / "events.jsonl";
  const auto events = one_of_each_kind();
  {
    auto log = EventLog::open(file);
    REQUIRE(log.has_value());
    for (const auto& event : events) REQUIRE(log->append(event).has_value());
  }
  const auto read = solstice::read_event_log(file);
  INFO((read ? std::string() : read.error().message));
  REQUIRE(read.has_value());
  REQUIRE(read->size() == events.size());
  for (std::size_t i = 0; i < events.size(); ++i) {
    CAPTURE(i);
    CHECK(MessageDifferencer::Equals(events[i], (*read)[i]));
  }
  CHECK((*read)[2].output().data() == all_bytes());

  // One JSON object per line, snake_case names.
  std::ifstream in(file);
  std::string line;
  std::size_t lines = 0;
  while (std::getline(in, line)) {
    ++lines;
    const auto parsed = nlohmann::json::parse(line);
    CHECK(parsed.is_object());
    CHECK(parsed.contains("job_id"));
  }
  CHECK(lines == events.size());
}

TEST_CASE("a step result's runner_stderr (the runner's own commands only) is absent from the log's JSON") {
  TempDir dir;
  const fs::path file = dir.path / "events.jsonl";
  v1::JobEvent event;
  event.set_job_id("job-1");
  event.mutable_step_finished()->set_step_index(0);
  {
    auto log = EventLog::open(file);
    REQUIRE(log.has_value());
    REQUIRE(log->append(event).has_value());
  }
  std::ifstream in(file);
  std::string line;
  REQUIRE(std::getline(in, line));
  const auto parsed = nlohmann::json::parse(line);
  CHECK(parsed["step_finished"].contains("exit_signal"));  // zero values are written ...
  CHECK_FALSE(parsed["step_finished"].contains("runner_stderr"));  // ... an unset optional is not
}

TEST_CASE("the log file has mode 0600 and is appended to, never truncated") {
  TempDir dir;
  const fs::path file = dir.path / "events.jsonl";
  {
    std::ofstream(file) << "";
  }
  fs::permissions(file, fs::perms(0644));
  v1::JobEvent event;
  event.set_job_id("j");
  event.mutable_notice()->set_message("first");
  {
    auto log = EventLog::open(file);
    REQUIRE(log.has_value());
    REQUIRE(log->append(event).has_value());
  }
  struct stat info {};
  REQUIRE(::stat(file.c_str(), &info) == 0);
  CHECK((info.st_mode & 07777) == 0600);

  const fs::path fresh = dir.path / "fresh.jsonl";
  {
    auto log = EventLog::open(fresh);
    REQUIRE(log.has_value());
    CHECK(log->path() == fresh);
  }
  REQUIRE(::stat(fresh.c_str(), &info) == 0);
  CHECK((info.st_mode & 07777) == 0600);

  event.mutable_notice()->set_message("second");
  {
    auto log = EventLog::open(file);
    REQUIRE(log.has_value());
    REQUIRE(log->append(event).has_value());
  }
  const auto read = solstice::read_event_log(file);
  REQUIRE(read.has_value());
  REQUIRE(read->size() == 2);
  CHECK((*read)[0].notice().message() == "first");
  CHECK((*read)[1].notice().message() == "second");
}

TEST_CASE("each append is on disk at once, and a moved-from log is inert") {
  TempDir dir;
  const fs::path file = dir.path / "events.jsonl";
  auto opened = EventLog::open(file);
  REQUIRE(opened.has_value());
  EventLog log = std::move(*opened);
  v1::JobEvent event;
  event.set_job_id("j");
  event.mutable_state()->set_state(v1::BOOTING);
  REQUIRE(log.append(event).has_value());
  // Read while the log is still open: nothing waits in a user-space buffer.
  const auto read = solstice::read_event_log(file);
  REQUIRE(read.has_value());
  REQUIRE(read->size() == 1);
  CHECK(read->front().state().state() == v1::BOOTING);
  CHECK_FALSE(opened->append(event).has_value());
}

TEST_CASE("event_to_json_line: one line, invalid UTF-8 in text repaired, bytes untouched") {
  v1::JobEvent event;
  event.set_job_id("j");
  event.mutable_error()->set_message(std::string("guest said \xff\xfe then\nmore"));
  const std::string line = solstice::event_to_json_line(event);
  CHECK(line.find('\n') == std::string::npos);
  const auto back = solstice::event_from_json_line(line);
  REQUIRE(back.has_value());
  CHECK(back->error().message() == "guest said \xEF\xBF\xBD\xEF\xBF\xBD then\nmore");

  v1::JobEvent console;
  console.mutable_console()->set_line(std::string("\xff\xfe\n\r", 4));
  const auto console_back = solstice::event_from_json_line(solstice::event_to_json_line(console));
  REQUIRE(console_back.has_value());
  CHECK(console_back->console().line() == std::string("\xff\xfe\n\r", 4));
}

TEST_CASE("a bad line is reported with file and line number") {
  TempDir dir;
  const fs::path file = dir.path / "events.jsonl";
  {
    std::ofstream out(file);
    out << R"({"job_id":"j","sequence":"0"})" << "\n\n"
        << R"({"job_id":"j","sequence":"1"})" << "\n"
        << R"({"job_id":"j","bogus":1})" << "\n";
  }
  const auto read = solstice::read_event_log(file);
  REQUIRE_FALSE(read.has_value());
  CHECK(read.error().message.rfind(file.string() + ":4: not a job event: ", 0) == 0);
  CHECK(read.error().message.find("bogus") != std::string::npos);

  {
    std::ofstream out(file);
    out << R"({"job_id":"j","sequence":"0"})" << "\n" << R"({"job_id":"j","seq)";  // torn last line
  }
  CHECK(solstice::read_event_log(file).error().message.rfind(file.string() + ":2: not a job event: ", 0) == 0);

  const auto missing = solstice::read_event_log(dir.path / "none.jsonl");
  REQUIRE_FALSE(missing.has_value());
  CHECK(missing.error().message.find("none.jsonl") != std::string::npos);
  CHECK_FALSE(EventLog::open(dir.path / "no-such-dir" / "events.jsonl").has_value());
}

TEST_CASE("appends from several threads never interleave within a line") {
  TempDir dir;
  const fs::path file = dir.path / "events.jsonl";
  auto log = EventLog::open(file);
  REQUIRE(log.has_value());
  constexpr int threads = 4, per_thread = 200;
  std::vector<std::thread> writers;
  for (int t = 0; t < threads; ++t) {
    writers.emplace_back([&log, t]() {
      for (int i = 0; i < per_thread; ++i) {
        v1::JobEvent event;
        event.set_job_id("writer-" + std::to_string(t));
        event.set_sequence(static_cast<uint64_t>(i));
        event.mutable_output()->set_data(std::string(3000, static_cast<char>('a' + t)));
        (void)log->append(event);
      }
    });
  }
  for (auto& writer : writers) writer.join();
  const auto read = solstice::read_event_log(file);
  REQUIRE(read.has_value());
  CHECK(read->size() == threads * per_thread);
  std::vector<uint64_t> next_sequence(threads, 0);
  for (const auto& event : *read) {
    const int t = event.job_id().back() - '0';
    REQUIRE(t >= 0);
    REQUIRE(t < threads);
    CHECK(event.sequence() == next_sequence[static_cast<std::size_t>(t)]++);
    CHECK(event.output().data() == std::string(3000, static_cast<char>('a' + t)));
  }
}

TEST_CASE("format v1: \"v\": 1 on every line, zero values printed, newer versions refused") {
  v1::JobEvent event;  // v not set: the writer adds it
  event.set_job_id("job-1");
  auto& finished = *event.mutable_step_finished();
  finished.set_step_index(0);
  finished.set_outcome(v1::STEP_SUCCEEDED);
  finished.set_exit_code(0);
  const auto line = solstice::event_to_json_line(event);
  const auto parsed = nlohmann::json::parse(line);
  CHECK(parsed["v"] == 1);
  CHECK(parsed["sequence"] == "0");  // 64-bit numbers are strings in protobuf's JSON
  CHECK(parsed["step_finished"]["step_index"] == 0);
  CHECK(parsed["step_finished"]["exit_code"] == 0);
  CHECK(parsed["step_finished"]["exit_signal"] == "");
  CHECK_FALSE(parsed.contains("result"));  // only the event's own kind

  // A line from before "v" existed is read; one from a newer format is not.
  auto old = solstice::event_from_json_line(R"({"job_id":"j","state":{"state":"QUEUED"}})");
  REQUIRE(old.has_value());
  CHECK(old->v() == 0);
  auto newer = solstice::event_from_json_line(R"({"v":2,"job_id":"j"})");
  REQUIRE_FALSE(newer.has_value());
  CHECK(newer.error().message.find("version 2") != std::string::npos);
}
