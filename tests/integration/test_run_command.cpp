// Longer than most files: every case of the `run` command on the real guest,
// each short and independent, sharing one workspace helper.
// `solstice-runner run` end to end: the real binary as a child process, a job file
// written by the test, a fresh state directory, the built test guest on TCG. Each
// case asserts the exit code, result.json, events.jsonl and the terminal output,
// and afterwards that nothing of the VM is left (no QEMU, no run dir, no keys).
#include <doctest/doctest.h>

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/message_differencer.h>
#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/job/event_log.hpp"
#include "solstice.pb.h"
#include "tests/integration/guest_fixture.hpp"

using namespace solstice;
using namespace solstice::testing;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

// One TCG boot takes 5-15 s on a loaded 2-core host; a whole job must end well
// within this, or the runner is hung.
constexpr auto run_limit = 300s;

fs::path runner_binary() { return fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner"; }

// ------------------------------------------------------------------ the child

struct RunnerRun {
  std::optional<ExitStatus> status;  // nullopt: still running at the limit (then killed)
  std::string out, err;
  Clock::duration elapsed{};
  // Exit code, or -1 when it died by a signal or never ended.
  int exit_code() const { return status && !status->signaled ? status->code : -1; }
  std::string describe() const {
    return (status ? status->describe() : std::string("no exit within the limit")) +
           "\n--- stdout (tail) ---\n" + out.substr(out.size() > 3000 ? out.size() - 3000 : 0) +
           "\n--- stderr (tail) ---\n" + err.substr(err.size() > 3000 ? err.size() - 3000 : 0);
  }
};

// Called whenever new output arrived, with all stdout and stderr so far.
using OutputWatch =
  std::function<void(pid_t runner_pid, const std::string& out, const std::string& err)>;

// Reads what a non-blocking pipe holds; marks it closed at EOF or on error.
void drain_pipe(int fd, std::string& into, bool& open) {
  char buffer[65536];
  while (open) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n > 0) {
      into.append(buffer, static_cast<size_t>(n));
    } else if (n == 0) {
      open = false;
    } else if (errno == EINTR) {
      continue;
    } else {
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        open = false;
      return;
    }
  }
}

// Runs solstice-runner with `args`, reading stdout and stderr while it runs so
// neither pipe fills. A runner still running at `limit` is killed by its PID.
RunnerRun run_runner(const std::vector<std::string>& args, const OutputWatch& watch = {},
                     std::chrono::seconds limit = run_limit) {
  std::vector<std::string> argv{runner_binary().string()};
  argv.insert(argv.end(), args.begin(), args.end());
  RunnerRun run;
  auto child = ChildProcess::spawn(argv);
  REQUIRE_MESSAGE(child.has_value(), why(child));
  auto started = Clock::now();
  bool out_open = child->stdout_fd() >= 0, err_open = child->stderr_fd() >= 0;
  std::optional<Clock::time_point> exited_at;
  for (;;) {
    pollfd fds[3] = {{out_open ? child->stdout_fd() : -1, POLLIN, 0},
                     {err_open ? child->stderr_fd() : -1, POLLIN, 0},
                     {exited_at ? -1 : child->exit_fd(), POLLIN, 0}};
    ::poll(fds, 3, 100);
    auto output_before = run.out.size() + run.err.size();
    drain_pipe(child->stdout_fd(), run.out, out_open);
    drain_pipe(child->stderr_fd(), run.err, err_open);
    if (watch && run.out.size() + run.err.size() != output_before && !exited_at)
      watch(child->pid(), run.out, run.err);
    if (!run.status && (run.status = child->try_wait()))
      exited_at = Clock::now();
    // Pipes close at exit; a leftover holder of them gets a short grace only.
    if (exited_at && ((!out_open && !err_open) || Clock::now() - *exited_at > 10s))
      break;
    if (!exited_at && Clock::now() - started > limit) {
      child->kill(SIGKILL);
      child->wait_for(10s);
      break;
    }
  }
  run.elapsed = (exited_at ? *exited_at : Clock::now()) - started;
  return run;
}

// ------------------------------------------------------------------ files

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream file(path, std::ios::binary);
  file << bytes;
  REQUIRE_MESSAGE(file.good(), "cannot write " << path.string());
}

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// A fresh state directory and a place for the job file; both removed afterwards.
struct Workspace {
  TempDir temp;
  fs::path state_dir;
  fs::path job_file;

  Workspace() {
    auto made = TempDir::make("solstice-run-test-");
    REQUIRE_MESSAGE(made.has_value(), why(made));
    temp = std::move(*made);
    state_dir = temp.path() / "state";
    job_file = temp.path() / "job.json";
    // The runner finds the built guest through its compiled default; say it
    // explicitly so a different default cannot make these tests miss it.
    ::setenv("SOLSTICE_TEST_GUEST_DIR", SOLSTICE_TEST_GUEST_DIR, 0);
  }

  void write_job(const json& job) { write_file(job_file, job.dump(2)); }

  std::vector<std::string> args(std::vector<std::string> extra = {},
                                std::string accel = "tcg") const {
    // Cold boots: these tests are about a booting VM (console, faults); templates and
    // restored jobs are tested in test_templates.cpp.
    std::vector<std::string> all{"run", job_file.string(), "--accel", accel, "--state-dir",
                                 state_dir.string(), "--cold"};
    all.insert(all.end(), extra.begin(), extra.end());
    return all;
  }
};

// ------------------------------------------------------------------ the record

struct JobRecord {
  fs::path dir;
  v1::JobResult result;
  std::vector<v1::JobEvent> events;
  std::string events_text, console_log, result_text;
};

JobRecord load_record(const fs::path& state_dir) {
  JobRecord record;
  std::vector<fs::path> jobs;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(state_dir / "jobs", ec))
    jobs.push_back(entry.path());
  REQUIRE_MESSAGE(jobs.size() == 1, "expected one job directory under "
                                        << (state_dir / "jobs").string());
  record.dir = jobs.front();
  record.events_text = read_file(record.dir / "events.jsonl");
  record.console_log = read_file(record.dir / "console.log");
  record.result_text = read_file(record.dir / "result.json");
  auto events = read_event_log(record.dir / "events.jsonl");
  REQUIRE_MESSAGE(events.has_value(), why(events));
  record.events = std::move(*events);
  REQUIRE_MESSAGE(!record.result_text.empty(), "no result.json in " << record.dir.string());
  auto parsed = google::protobuf::util::JsonStringToMessage(record.result_text, &record.result);
  REQUIRE_MESSAGE(parsed.ok(), "result.json: " << parsed.ToString());
  return record;
}

// Every event in order, one state path, ending in the result that result.json holds.
void check_event_log_shape(const JobRecord& record) {
  REQUIRE(!record.events.empty());
  for (size_t i = 0; i < record.events.size(); ++i) {
    CHECK(record.events[i].sequence() == i);
    CHECK(record.events[i].job_id() == record.result.job_id());
  }
  for (size_t i = 1; i < record.events.size(); ++i)
    CHECK(record.events[i].timestamp_us() >= record.events[i - 1].timestamp_us());
  const auto& last = record.events.back();
  REQUIRE(last.has_result());
  CHECK_MESSAGE(google::protobuf::util::MessageDifferencer::Equals(last.result(), record.result),
                "the last event's result differs from result.json");
  CHECK(record.dir.filename().string() == record.result.job_id());
  // Format v1: every line says so; the job_started event comes first.
  std::istringstream lines(record.events_text);
  for (std::string line; std::getline(lines, line);)
    CHECK_MESSAGE(contains(line, "\"v\":1,"), line);
  CHECK(record.events.front().has_job_started());
  REQUIRE(record.events.size() > 1);
  CHECK(record.events[1].has_state());
  CHECK(record.events[1].state().state() == v1::QUEUED);
  CHECK(record.result.started_at_us() > 0);
  CHECK(record.result.ended_at_us() >= record.result.started_at_us());
  int cleaned_up = 0;
  for (const auto& event : record.events)
    cleaned_up += event.has_state() && event.state().state() == v1::CLEANED_UP;
  CHECK(cleaned_up == 1);
}

std::vector<v1::JobState> states_of(const JobRecord& record) {
  std::vector<v1::JobState> states;
  for (const auto& event : record.events)
    if (event.has_state())
      states.push_back(event.state().state());
  return states;
}

// A step's bytes on one stream, reassembled from the output events; the
// per-stream sequence numbers must run 0, 1, 2, ... with no gap.
std::string step_output(const JobRecord& record, uint32_t step, v1::OutputStream stream) {
  std::string bytes;
  uint64_t expected_sequence = 0;
  for (const auto& event : record.events) {
    if (!event.has_output() || event.output().step_index() != step ||
        event.output().stream() != stream)
      continue;
    CHECK_MESSAGE(event.output().sequence() == expected_sequence,
                  "output sequence gap in step " << step << " stream " << stream);
    expected_sequence = event.output().sequence() + 1;
    bytes += event.output().data();
  }
  return bytes;
}

std::vector<std::string> messages_of(const JobRecord& record, v1::JobEvent::KindCase kind) {
  std::vector<std::string> messages;
  for (const auto& event : record.events) {
    if (event.kind_case() != kind)
      continue;
    messages.push_back(kind == v1::JobEvent::kError ? event.error().message()
                                                     : event.notice().message());
  }
  return messages;
}

// How many step_finished events the record holds for step `index`.
int finished_events(const JobRecord& record, uint32_t index) {
  int count = 0;
  for (const auto& event : record.events)
    count += event.has_step_finished() && event.step_finished().step_index() == index;
  return count;
}

bool any_contains(const std::vector<std::string>& texts, const std::string& needle) {
  for (const auto& text : texts)
    if (contains(text, needle))
      return true;
  return false;
}

// ------------------------------------------------------------------ leftovers

// After every job: no QEMU (nor anything) running for this state dir, no VM work
// files, nothing key-like in the job's record.
void check_nothing_left(const Workspace& ws) {
  auto processes = processes_mentioning(ws.state_dir.string());
  std::string listing;
  for (const auto& p : processes)
    listing += "\n  " + p;
  CHECK_MESSAGE(processes.empty(), "processes left for this state dir:" << listing);

  std::error_code ec;
  auto run_dir = ws.state_dir / "run";
  if (fs::exists(run_dir, ec)) {
    std::string left;
    for (const auto& entry : fs::recursive_directory_iterator(run_dir, ec))
      left += "\n  " + entry.path().string();
    CHECK_MESSAGE(left.empty(), "left in " << run_dir.string() << ":" << left);
  }

  for (const auto& entry : fs::recursive_directory_iterator(ws.state_dir / "jobs", ec)) {
    auto name = entry.path().filename().string();
    CHECK_MESSAGE(!contains(name, "key"), "key-like file left: " << entry.path().string());
    if (entry.is_regular_file())
      CHECK_MESSAGE(!contains(read_file(entry.path()), "PRIVATE KEY"),
                    "private key text in " << entry.path().string());
  }
}

// 1 MiB of numbered 64-byte lines, exactly what the guest's awk below prints.
constexpr int pattern_lines = 16384;
constexpr const char* pattern_text = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123";
std::string expected_pattern() {
  std::string text;
  char line[80];
  for (int i = 0; i < pattern_lines; ++i) {
    std::snprintf(line, sizeof line, "%06d %s\n", i, pattern_text);
    text += line;
  }
  return text;
}
std::string pattern_script() {
  return std::string("awk 'BEGIN { for (i = 0; i < ") + std::to_string(pattern_lines) +
         "; i++) printf \"%06d %s\\n\", i, \"" + pattern_text + "\" }'";
}

// Every byte value, then pseudo-random bytes (fixed seed: reproducible).
std::string binary_payload() {
  std::string bytes;
  for (int i = 0; i < 256; ++i)
    bytes += static_cast<char>(i);
  std::mt19937 random(20261127);
  for (int i = 0; i < 96 * 1024; ++i)
    bytes += static_cast<char>(random() & 0xff);
  return bytes;
}

const std::string secret = "tok-7Hq2Zr8W-s3cr3t-value";

}  // namespace

TEST_SUITE("run_command") {

TEST_CASE("a multi-step job: env, secrets redacted, upload, allowed failure, exact bytes, artifact") {
  Workspace ws;
  auto payload = binary_payload();
  write_file(ws.temp.path() / "payload.bin", payload);
  REQUIRE(expected_pattern().size() == 1024u * 1024u);
  ws.write_job({
    {"name", "everything that succeeds"},
    {"runs_on", "solstice-test-guest"},
    {"env", {{"GREETING", "hello, world"}}},
    {"secrets", {{"DEPLOY_TOKEN", secret}}},
    {"uploads", json::array({{{"source", "payload.bin"}, {"destination", "/tmp/in/payload.bin"}}})},
    {"steps",
     json::array({
       {{"name", "env and secret"},
        {"script",
         // The secret whole, on both streams, and split across two writes.
         "echo \"greeting=$GREETING\"\n"
         "echo \"token=$DEPLOY_TOKEN\"\n"
         "echo \"stderr token=$DEPLOY_TOKEN\" >&2\n"
         "head=$(echo \"$DEPLOY_TOKEN\" | cut -c1-9); tail=$(echo \"$DEPLOY_TOKEN\" | cut -c10-)\n"
         "printf 'split=%s' \"$head\"; sleep 0.5; printf '%s\\n' \"$tail\"\n"
         "printf 'split=%s' \"$head\" >&2; sleep 0.5; printf '%s\\n' \"$tail\" >&2\n"}},
       {{"name", "allowed to fail"},
        {"script", "echo failing on purpose; exit 3"},
        {"allow_failure", true}},
       {{"name", "one mebibyte"}, {"script", pattern_script()}},
       {{"name", "binary bytes"},
        {"script",
         "cat /tmp/in/payload.bin\ncat /tmp/in/payload.bin >&2\n"
         "mkdir -p /tmp/out && cp /tmp/in/payload.bin /tmp/out/copy.bin\n"}},
     })},
    {"artifacts", json::array({{{"path", "/tmp/out/copy.bin"}}})},
  });

  auto run = run_runner(ws.args());
  INFO(run.describe());
  CHECK(run.exit_code() == 0);
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  const auto& result = record.result;
  CHECK(result.status() == v1::SUCCEEDED);
  CHECK(result.exit_code() == 0);
  // Zero values are written, not left for the reader to know proto3's defaults.
  CHECK(contains(record.result_text, "\"exit_code\": 0"));
  auto last_line = record.events_text.substr(
    record.events_text.rfind('\n', record.events_text.size() - 2) + 1);
  CHECK(contains(last_line, "\"status\":\"SUCCEEDED\",\"exit_code\":0,"));
  CHECK(result.shutdown_method() == "powerdown");
  REQUIRE(result.steps_size() == 4);
  CHECK(result.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(result.steps(1).outcome() == v1::STEP_ALLOWED_FAILURE);
  CHECK(result.steps(1).exit_code() == 3);
  CHECK(result.steps(2).outcome() == v1::STEP_SUCCEEDED);
  CHECK(result.steps(3).outcome() == v1::STEP_SUCCEEDED);
  for (int i = 0; i < 4; ++i)
    CHECK(result.steps(i).step_index() == static_cast<uint32_t>(i));

  auto states = states_of(record);
  std::vector<v1::JobState> path{v1::QUEUED,          v1::PREPARING,      v1::BOOTING,
                                 v1::WAITING_FOR_SSH, v1::CONSOLE_HANDOFF, v1::RUNNING,
                                 v1::COLLECTING_ARTIFACTS, v1::SHUTTING_DOWN, v1::CLEANED_UP};
  CHECK(states == path);

  // Redaction: exact step output, with the secret masked even when split.
  CHECK(step_output(record, 0, v1::STDOUT) == "greeting=hello, world\ntoken=***\nsplit=***\n");
  CHECK(step_output(record, 0, v1::STDERR) == "stderr token=***\nsplit=***\n");
  CHECK(contains(run.out, "token=***"));
  CHECK(contains(run.err, "stderr token=***"));
  CHECK_FALSE(contains(run.out, secret));
  CHECK_FALSE(contains(run.err, secret));
  CHECK_FALSE(contains(record.events_text, secret));
  for (const auto& event : record.events)  // decoded: base64 output, console lines, all
    CHECK_FALSE(contains(event.SerializeAsString(), secret));
  CHECK_FALSE(contains(record.console_log, secret));
  CHECK_FALSE(contains(record.result_text, secret));
  // Not even its halves leak where they were written apart.
  CHECK_FALSE(contains(run.out, secret.substr(9)));

  CHECK(step_output(record, 1, v1::STDOUT) == "failing on purpose\n");

  // Every byte, in order, through the events and to the terminal.
  auto pattern = expected_pattern();
  auto big = step_output(record, 2, v1::STDOUT);
  CHECK(big.size() == pattern.size());
  CHECK(big == pattern);
  CHECK(step_output(record, 2, v1::STDERR).empty());
  CHECK(contains(run.out, pattern));
  CHECK(step_output(record, 3, v1::STDOUT) == payload);
  CHECK(step_output(record, 3, v1::STDERR) == payload);
  CHECK(contains(run.out, payload));
  CHECK(contains(run.err, payload));

  // The uploaded file came back as an artifact, byte for byte.
  auto artifact = record.dir / "artifacts" / "copy.bin";
  REQUIRE(result.artifacts_size() == 1);
  CHECK(fs::path(result.artifacts(0)) == artifact);
  CHECK(read_file(artifact) == payload);

  // The terminal shows steps, the allowed failure and the summary.
  CHECK(contains(run.out, "==> step 1/4: env and secret"));
  CHECK(contains(run.out, "failed (allowed)"));
  CHECK(contains(run.out, result.summary()));
  CHECK(contains(run.out, "(exit code 0)"));
  check_nothing_left(ws);
}

TEST_CASE("a failing step fails the job with its exit code; later steps are skipped") {
  Workspace ws;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({
                {{"name", "fine"}, {"script", "echo first"}},
                {{"name", "breaks"}, {"script", "echo about to fail; echo oops >&2; exit 7"}},
                {{"name", "never"}, {"script", "echo should-not-run"}},
              })},
  });
  auto run = run_runner(ws.args());
  INFO(run.describe());
  CHECK(run.exit_code() == 7);
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  const auto& result = record.result;
  CHECK(result.status() == v1::FAILED);
  CHECK(result.exit_code() == 7);
  CHECK(result.exit_signal().empty());
  REQUIRE(result.steps_size() == 3);
  CHECK(result.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(result.steps(1).outcome() == v1::STEP_FAILED);
  CHECK(result.steps(1).exit_code() == 7);
  CHECK(result.steps(2).outcome() == v1::STEP_SKIPPED);
  CHECK(contains(result.error(), "breaks"));
  CHECK(step_output(record, 1, v1::STDERR) == "oops\n");
  CHECK_FALSE(contains(run.out, "should-not-run"));
  int started = 0;
  for (const auto& event : record.events)
    started += event.has_step_started();
  CHECK(started == 2);
  CHECK(result.shutdown_method() == "powerdown");
  CHECK(contains(run.out, "<== step 'breaks' failed (exit 7)"));
  CHECK(contains(run.out, "(exit code 7)"));
  check_nothing_left(ws);
}

TEST_CASE("a step killed by a signal reports the signal and exits 128+N") {
  Workspace ws;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({
                {{"name", "killed"}, {"script", "echo before; kill -KILL $$; echo after"}},
                {{"name", "never"}, {"script", "echo should-not-run"}},
              })},
  });
  auto run = run_runner(ws.args());
  INFO(run.describe());
  CHECK(run.exit_code() == 137);
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  const auto& result = record.result;
  CHECK(result.status() == v1::FAILED);
  CHECK(result.exit_code() == 137);
  CHECK(result.exit_signal() == "KILL");
  REQUIRE(result.steps_size() == 2);
  CHECK(result.steps(0).outcome() == v1::STEP_FAILED);
  CHECK(result.steps(0).exit_signal() == "KILL");
  CHECK(result.steps(0).exit_code() == 137);
  CHECK(result.steps(1).outcome() == v1::STEP_SKIPPED);
  CHECK(step_output(record, 0, v1::STDOUT) == "before\n");
  CHECK(contains(run.out, "SIGKILL"));
  check_nothing_left(ws);
}

TEST_CASE("a step timeout ends the job quickly as timed out") {
  Workspace ws;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({
                {{"name", "sleeper"}, {"script", "echo sleeping; sleep 60"}, {"timeout_seconds", 2}},
                {{"name", "never"}, {"script", "echo should-not-run"}},
              })},
  });
  std::optional<Clock::time_point> step_seen;
  auto run = run_runner(ws.args(), [&](pid_t, const std::string& out, const std::string&) {
    if (!step_seen && contains(out, "==> step"))
      step_seen = Clock::now();
  });
  auto ended = Clock::now();
  INFO(run.describe());
  CHECK(run.exit_code() == 124);
  REQUIRE(step_seen.has_value());
  // 2 s of step, then a power-down: far below the 60 s the command wanted.
  CHECK(ended - *step_seen < 30s);
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  const auto& result = record.result;
  CHECK(result.status() == v1::TIMED_OUT);
  CHECK(result.exit_code() == 124);
  REQUIRE(result.steps_size() == 2);
  CHECK(result.steps(0).outcome() == v1::STEP_TIMED_OUT);
  CHECK(result.steps(0).duration_ms() >= 1900);
  CHECK(result.steps(0).duration_ms() < 15000);
  CHECK(result.steps(1).outcome() == v1::STEP_SKIPPED);
  CHECK(step_output(record, 0, v1::STDOUT) == "sleeping\n");
  CHECK(contains(result.error(), "sleeper"));
  CHECK(contains(run.out, "<== step 'sleeper' timed out"));
  check_nothing_left(ws);
}

TEST_CASE("the job timeout ends a job whose step sleeps") {
  Workspace ws;
  constexpr int job_timeout = 30;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    {"timeout_seconds", job_timeout},
    {"steps", json::array({{{"name", "forever"}, {"script", "echo sleeping; sleep 600"}}})},
  });
  auto run = run_runner(ws.args());
  INFO(run.describe());
  CHECK(run.exit_code() == 124);
  CHECK(run.elapsed >= std::chrono::seconds(job_timeout));
  CHECK(run.elapsed < std::chrono::seconds(job_timeout + 60));
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  const auto& result = record.result;
  CHECK(result.status() == v1::TIMED_OUT);
  CHECK(result.exit_code() == 124);
  CHECK(contains(result.error(), "timed out"));
  CHECK(any_contains(messages_of(record, v1::JobEvent::kError), "timed out"));
  REQUIRE(result.steps_size() == 1);
  CHECK(result.steps(0).outcome() != v1::STEP_SUCCEEDED);
  // On a slow host the deadline may fall during boot; a step that did start was
  // interrupted, not skipped.
  bool step_started = false;
  for (const auto& event : record.events)
    step_started |= event.has_step_started();
  if (step_started)
    CHECK(result.steps(0).outcome() != v1::STEP_SKIPPED);
  check_nothing_left(ws);
}

TEST_CASE("SIGINT while a step runs cancels the job and powers the VM down") {
  Workspace ws;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({
                {{"name", "long"}, {"script", "echo started; sleep 600"}},
                {{"name", "never"}, {"script", "echo should-not-run"}},
              })},
  });
  std::optional<Clock::time_point> interrupted;
  auto run = run_runner(ws.args(), [&](pid_t pid, const std::string& out, const std::string&) {
    if (!interrupted && contains(out, "==> step") && contains(out, "started\n")) {
      ::kill(pid, SIGINT);
      interrupted = Clock::now();
    }
  });
  auto ended = Clock::now();
  INFO(run.describe());
  REQUIRE(interrupted.has_value());
  CHECK(run.exit_code() == 130);
  CHECK(ended - *interrupted < 30s);
  CHECK(contains(run.err, "cancelling"));
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  const auto& result = record.result;
  CHECK(result.status() == v1::CANCELLED);
  CHECK(result.exit_code() == 130);
  CHECK(result.shutdown_method() == "powerdown");
  REQUIRE(result.steps_size() == 2);
  // The interrupted step ran: cancelled (once), not skipped, whichever came
  // first, the executor's answer or the end of the VM.
  CHECK(result.steps(0).outcome() == v1::STEP_CANCELLED);
  CHECK(finished_events(record, 0) == 1);
  CHECK(result.steps(1).outcome() == v1::STEP_SKIPPED);
  CHECK(step_output(record, 0, v1::STDOUT) == "started\n");
  CHECK_FALSE(contains(run.out, "should-not-run"));
  check_nothing_left(ws);
}

TEST_CASE("a second SIGTERM kills a VM that ignores the power button, leaving nothing behind") {
  Workspace ws;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    // Without acpid the guest ignores system_powerdown: the runner would wait
    // for it, and the second signal must cut that short.
    {"steps", json::array({{{"name", "deaf"},
                            {"script", "sudo kill $(pidof acpid); echo started; sleep 600"}}})},
  });
  std::optional<Clock::time_point> first, second;
  auto run = run_runner(ws.args(), [&](pid_t pid, const std::string& out, const std::string& err) {
    if (!first && contains(out, "started\n")) {
      ::kill(pid, SIGTERM);
      first = Clock::now();
    } else if (first && !second && contains(err, "cancelling") &&
               contains(out, "shutting down")) {
      ::kill(pid, SIGTERM);
      second = Clock::now();
    }
  });
  auto ended = Clock::now();
  INFO(run.describe());
  REQUIRE(first.has_value());
  REQUIRE(second.has_value());
  CHECK(run.exit_code() == 130);
  CHECK(ended - *second < 15s);
  CHECK(contains(run.err, "killing"));
  auto record = load_record(ws.state_dir);
  const auto& result = record.result;
  CHECK(result.status() == v1::CANCELLED);
  CHECK(result.exit_code() == 130);
  CHECK(result.shutdown_method() == "kill");
  REQUIRE(!record.events.empty());
  CHECK(record.events.back().has_result());
  check_nothing_left(ws);
}

TEST_CASE("--json and --accel auto: one event per line; a missing artifact fails the job") {
  Workspace ws;
  ws.write_job({
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({{{"name", "make files"},
                            {"script",
                             "mkdir -p /tmp/out && echo one > /tmp/out/a.txt && "
                             "echo three > /tmp/out/c.txt"}}})},
    {"artifacts", json::array({
                    {{"path", "/tmp/out/a.txt"}},
                    {{"path", "/tmp/out/missing.txt"}},
                    {{"path", "/tmp/out/optional.txt"}, {"optional", true}},
                    {{"path", "/tmp/out/c.txt"}, {"destination", "renamed-c.txt"}},
                  })},
  });
  auto run = run_runner(ws.args({"--json"}, "auto"));
  INFO(run.describe());

  // stdout: nothing but events, one parsable JSON object per line, the same
  // events the record holds.
  std::vector<v1::JobEvent> printed;
  std::istringstream lines(run.out);
  for (std::string line; std::getline(lines, line);) {
    auto event = event_from_json_line(line);
    CHECK_MESSAGE(event.has_value(), "not a JSON event line: " << line);
    if (event)
      printed.push_back(std::move(*event));
    CHECK(json::accept(line));
  }
  auto record = load_record(ws.state_dir);
  check_event_log_shape(record);
  REQUIRE(printed.size() == record.events.size());
  for (size_t i = 0; i < printed.size(); ++i)
    CHECK(google::protobuf::util::MessageDifferencer::Equals(printed[i], record.events[i]));

  const auto& result = record.result;
  CHECK(result.status() == v1::FAILED);
  CHECK(run.exit_code() == result.exit_code());
  CHECK(run.exit_code() != 0);
  CHECK(run.exit_code() != 125);
  REQUIRE(result.steps_size() == 1);
  CHECK(result.steps(0).outcome() == v1::STEP_SUCCEEDED);
  CHECK(contains(result.error(), "/tmp/out/missing.txt"));
  CHECK(any_contains(messages_of(record, v1::JobEvent::kError), "/tmp/out/missing.txt"));
  CHECK(any_contains(messages_of(record, v1::JobEvent::kNotice), "/tmp/out/optional.txt"));
  CHECK_FALSE(any_contains(messages_of(record, v1::JobEvent::kError), "/tmp/out/optional.txt"));
  // The artifacts that exist were still downloaded, before and after the missing one.
  auto artifacts = record.dir / "artifacts";
  CHECK(read_file(artifacts / "a.txt") == "one\n");
  CHECK(read_file(artifacts / "renamed-c.txt") == "three\n");
  CHECK(result.artifacts_size() == 2);
  CHECK_FALSE(fs::exists(artifacts / "missing.txt"));
  CHECK_FALSE(fs::exists(artifacts / "optional.txt"));
  CHECK(result.shutdown_method() == "powerdown");

  // Auto: KVM where it boots; where /dev/kvm is absent, TCG at once; where KVM is
  // there but cannot boot the guest, a notice and a second boot on TCG.
  std::vector<std::string> boots;
  for (const auto& event : record.events)
    if (event.has_state() && event.state().state() == v1::BOOTING)
      boots.push_back(event.state().detail());
  REQUIRE(!boots.empty());
  CHECK(boots.size() <= 2);
  if (!fs::exists("/dev/kvm"))
    CHECK(boots.front().rfind("tcg", 0) == 0);
  if (boots.size() == 2) {
    CHECK(boots.front().rfind("kvm", 0) == 0);
    CHECK(boots.back().rfind("tcg", 0) == 0);
    CHECK(any_contains(messages_of(record, v1::JobEvent::kNotice), "falling back to TCG"));
  }
  MESSAGE("accel auto booted: " << boots.front() << (boots.size() == 2 ? " then " + boots.back() : ""));
  check_nothing_left(ws);
}

TEST_CASE("invalid input exits 2 before any VM starts") {
  Workspace ws;
  auto check_no_vm = [&](const RunnerRun& run) {
    CHECK(run.elapsed < 20s);
    CHECK_FALSE(contains(run.out, "booting"));
    auto jobs = ws.state_dir / "jobs";
    CHECK((!fs::exists(jobs) || fs::is_empty(jobs)));
    check_nothing_left(ws);
  };

  SUBCASE("malformed job JSON names line and column") {
    write_file(ws.job_file,
               "{\n"
               "  \"runs_on\": \"solstice-test-guest\",\n"
               "  \"steps\": [ { \"script\": \"true\" } ,, ]\n"
               "}\n");
    auto run = run_runner(ws.args());
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(std::regex_search(run.err, std::regex("job\\.json:3:[0-9]+")));
    check_no_vm(run);
  }
  SUBCASE("a runs_on label nobody configured") {
    ws.write_job({{"runs_on", "no-such-label"}, {"steps", json::array({{{"script", "true"}}})}});
    auto run = run_runner(ws.args());
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(contains(run.err, "no-such-label"));
    check_no_vm(run);
  }
  SUBCASE("the quick form with an unknown --runs-on label") {
    write_file(ws.temp.path() / "script.sh", "echo hi\n");
    auto run = run_runner({"run", "--runs-on", "no-such-label", "--script",
                           (ws.temp.path() / "script.sh").string(), "--accel", "tcg",
                           "--state-dir", ws.state_dir.string()});
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(contains(run.err, "no-such-label"));
    check_no_vm(run);
  }
}

}  // TEST_SUITE
