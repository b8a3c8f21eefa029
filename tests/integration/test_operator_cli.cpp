// The operator's side of `solstice-runner`, on the real binary: --version, an
// unknown command, invalid input under --json, and the `jobs` commands (list,
// show, logs, cancel) against the record of a real job on the test guest, which
// is cancelled from another process while it runs. One guest boot in all.
#include <doctest/doctest.h>

#include <poll.h>
#include <signal.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/base/version.hpp"
#include "runtime/job/event_log.hpp"
#include "tests/integration/guest_fixture.hpp"

using namespace solstice;
using namespace solstice::testing;
using namespace std::chrono_literals;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

fs::path runner_binary() { return fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner"; }

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// solstice-runner as a child, its output read while it runs.
struct Runner {
  ChildProcess child;
  std::string out, err;
  std::optional<ExitStatus> status;

  explicit Runner(const std::vector<std::string>& args) {
    std::vector<std::string> argv{runner_binary().string()};
    argv.insert(argv.end(), args.begin(), args.end());
    auto spawned = ChildProcess::spawn(argv);
    REQUIRE_MESSAGE(spawned.has_value(), why(spawned));
    child = std::move(*spawned);
  }

  // Reads what is there (waiting up to `wait` for something); notes the exit.
  void pump(std::chrono::milliseconds wait = 100ms) {
    pollfd fds[2] = {{child.stdout_fd(), POLLIN, 0}, {child.stderr_fd(), POLLIN, 0}};
    ::poll(fds, 2, static_cast<int>(wait.count()));
    out += read_available(child.stdout_fd());
    err += read_available(child.stderr_fd());
    if (!status)
      status = child.try_wait();
  }

  // Waits for the exit (killing the child at `limit`); returns the exit code, -1
  // when it died by a signal or did not end.
  int finish(std::chrono::seconds limit = 60s) {
    auto deadline = std::chrono::steady_clock::now() + limit;
    while (!status && std::chrono::steady_clock::now() < deadline)
      pump();
    if (!status) {
      child.kill(SIGKILL);
      status = child.wait_for(10s);
      return -1;
    }
    pump(0ms);  // what the pipes still hold
    return status->signaled ? -1 : status->code;
  }

  std::string describe() const {
    return "--- stdout ---\n" + out.substr(0, 4000) + "\n--- stderr ---\n" + err.substr(0, 4000);
  }
};

// Runs a command to its end.
Runner run(const std::vector<std::string>& args, int* code, std::chrono::seconds limit = 60s) {
  Runner runner(args);
  *code = runner.finish(limit);
  return runner;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    lines.push_back(line);
  return lines;
}

}  // namespace

TEST_SUITE("operator_cli") {

TEST_CASE("--version prints the project version and the git commit of the build") {
  int code = 0;
  auto runner = run({"--version"}, &code);
  INFO(runner.describe());
  CHECK(code == 0);
  CHECK(runner.out == runner_version_text() + "\n");
  std::smatch match;
  REQUIRE(std::regex_search(runner.out, match,
                            std::regex("^solstice-runner ([0-9]+\\.[0-9]+\\.[0-9]+) \\(commit "
                                       "([0-9a-f]{12}(-dirty)?|unknown)\\)\n$")));
  // Built from a git checkout (as CI builds are): the commit is one of this
  // repository's (HEAD's when the build is current; others may commit meanwhile).
  auto commit = match[2].str().substr(0, 12);
  if (commit != "unknown" && fs::exists(fs::path(SOLSTICE_SOURCE_DIR) / ".git")) {
    auto git = ChildProcess::spawn(
      {"git", "-C", SOLSTICE_SOURCE_DIR, "cat-file", "-e", commit + "^{commit}"});
    REQUIRE(git.has_value());
    auto status = git->wait_for(10s);
    REQUIRE(status.has_value());
    CHECK_MESSAGE(status->code == 0, commit << " is not a commit of " << SOLSTICE_SOURCE_DIR);
  }
  if (fs::exists(fs::path(SOLSTICE_SOURCE_DIR) / ".git"))
    CHECK(commit != "unknown");
}

TEST_CASE("an unknown command is named, and the commands are listed") {
  int code = 0;
  auto runner = run({"frobnicate"}, &code);
  INFO(runner.describe());
  CHECK(code == 2);
  CHECK(contains(runner.err, "unknown command \"frobnicate\""));
  for (const auto* command : {"run", "jobs", "node", "submit"})
    CHECK(std::regex_search(runner.err, std::regex(std::string("\n  ") + command + " +[a-z]")));
  CHECK_FALSE(contains(runner.err, "A subcommand is required"));
  auto none = run({}, &code);
  CHECK(code == 2);
  CHECK(contains(none.err, "a command is required"));
}

TEST_CASE("with --json, invalid input is a JSON error line too, and exit code 2") {
  auto made = TempDir::make("solstice-cli-test-");
  REQUIRE(made.has_value());
  auto job_file = made->path() / "broken.json";
  std::ofstream(job_file) << "{ \"runs_on\": \"no-such-label\", \"steps\": [ { \"script\": \"true\" } ] }";
  int code = 0;
  auto runner = run({"run", "--cold", job_file.string(), "--json", "--state-dir",
                     (made->path() / "state").string()},
                    &code);
  INFO(runner.describe());
  CHECK(code == 2);
  CHECK(contains(runner.err, "no-such-label"));  // still said plainly on stderr
  auto lines = lines_of(runner.out);
  REQUIRE(lines.size() == 1);
  auto event = event_from_json_line(lines[0]);
  REQUIRE_MESSAGE(event.has_value(), lines[0]);
  CHECK(event->v() == 1);
  CHECK(event->has_error());
  CHECK(contains(event->error().message(), "no-such-label"));
  CHECK(lines[0].rfind("{\"v\":1,", 0) == 0);
}

TEST_CASE("jobs list, show, logs and cancel on a real job, cancelled from another process") {
  auto made = TempDir::make("solstice-jobs-test-");
  REQUIRE(made.has_value());
  ::setenv("SOLSTICE_TEST_GUEST_DIR", SOLSTICE_TEST_GUEST_DIR, 0);
  const auto state = (made->path() / "state").string();
  const auto job_file = made->path() / "job.json";
  std::ofstream(job_file) << json{
    {"name", "cancel me"},
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({{{"name", "hello"}, {"script", "echo out-line; echo err-line >&2"}},
                           {{"name", "wait"}, {"script", "echo waiting; sleep 600"}},
                           {{"name", "never"}, {"script", "echo should-not-run"}}})},
  }.dump();
  auto jobs = [&](std::vector<std::string> args, int* code) {
    args.insert(args.begin(), "jobs");
    args.insert(args.begin() + 2, {"--state-dir", state});
    return run(args, code);
  };

  Runner job({"run", "--cold", job_file.string(), "--json", "--accel", "tcg", "--state-dir", state});
  // Until the second step runs: its "waiting" is in the JSON stream.
  auto deadline = std::chrono::steady_clock::now() + 240s;
  std::string job_id;
  while (!job.status && std::chrono::steady_clock::now() < deadline) {
    job.pump();
    bool waiting = false;
    for (const auto& line : lines_of(job.out)) {
      auto event = event_from_json_line(line);
      if (event && event->has_output() && event->output().data() == "waiting\n") {
        waiting = true;
        job_id = event->job_id();
      }
    }
    if (waiting)
      break;
  }
  INFO(job.describe());
  REQUIRE_FALSE(job_id.empty());

  int code = 0;
  // A follower started while the job runs ends with the job.
  Runner follower({"jobs", "logs", job_id.substr(job_id.size() - 6), "--follow", "--state-dir",
                   state});
  auto listed = jobs({"list", "--json"}, &code);
  CHECK(code == 0);
  auto entry = json::parse(listed.out);
  CHECK(entry["v"] == 1);
  CHECK(entry["job_id"] == job_id);
  CHECK(entry["state"] == "running");
  CHECK(entry["exit_code"].is_null());
  CHECK(entry["name"] == "cancel me");
  CHECK(entry["runner_pid"] == job.child.pid());
  auto shown = jobs({"show", job_id}, &code);
  CHECK(code == 0);
  CHECK(contains(shown.out, "state: running"));

  auto cancel_started = std::chrono::steady_clock::now();
  auto cancelled = jobs({"cancel", job_id}, &code);
  INFO(cancelled.describe());
  CHECK(code == 0);
  CHECK(contains(cancelled.out, "cancel requested for job " + job_id));
  CHECK(contains(cancelled.out, "job " + job_id + " cancelled (exit code 130)"));
  CHECK(std::chrono::steady_clock::now() - cancel_started < 30s);
  CHECK(job.finish(60s) == 130);

  // The JSON stream: "v": 1 first on every line, job_started first, zero values
  // printed, start and end in the result.
  auto lines = lines_of(job.out);
  REQUIRE(lines.size() > 3);
  for (const auto& line : lines)
    CHECK_MESSAGE(line.rfind("{\"v\":1,", 0) == 0, line);
  auto first = event_from_json_line(lines.front());
  REQUIRE(first.has_value());
  REQUIRE(first->has_job_started());
  CHECK(first->sequence() == 0);
  CHECK(first->job_started().name() == "cancel me");
  CHECK(first->job_started().runs_on() == "solstice-test-guest");
  CHECK(!first->job_started().image().empty());
  CHECK(!first->job_started().host().empty());
  CHECK(first->job_started().runner_version() == runner_version());
  CHECK(first->job_started().runner_commit() == runner_commit());
  CHECK(contains(lines.front(), "\"sequence\":\"0\""));
  bool step0_output = false, step0_exit0 = false;
  for (const auto& line : lines) {
    step0_output |= contains(line, "\"output\":{\"step_index\":0,");
    step0_exit0 |= contains(line, "\"step_finished\":{\"step_index\":0,") &&
                   contains(line, "\"exit_code\":0,");
  }
  CHECK(step0_output);
  CHECK(step0_exit0);
  auto last = event_from_json_line(lines.back());
  REQUIRE(last.has_value());
  REQUIRE(last->has_result());
  CHECK(last->result().started_at_us() >= first->timestamp_us() - 1000000);
  CHECK(last->result().ended_at_us() >= last->result().started_at_us());
  CHECK(last->result().ended_at_us() <= last->timestamp_us());

  // The follower saw the output as it came and the end.
  CHECK(follower.finish(30s) == 0);
  CHECK(contains(follower.out, "out-line\n"));
  CHECK(contains(follower.out, "waiting\n"));
  CHECK(contains(follower.err, "err-line\n"));
  CHECK(contains(follower.out, "cancelled"));

  // The ended record.
  listed = jobs({"list"}, &code);
  CHECK(code == 0);
  CHECK(std::regex_search(listed.out, std::regex(job_id + " +cancelled +130 +[0-9-]+ [0-9:]+ +"
                                                          "[0-9.hms]+ +cancel me\n")));
  shown = jobs({"show", job_id}, &code);
  CHECK(code == 0);
  CHECK(contains(shown.out, "state: cancelled"));
  CHECK(contains(shown.out, "STEP"));
  CHECK(contains(shown.out, "(exit code 130)"));
  shown = jobs({"show", job_id, "--json"}, &code);
  auto show_json = json::parse(shown.out);
  CHECK(show_json["result"]["status"] == "CANCELLED");
  CHECK(show_json["job_started"]["name"] == "cancel me");
  CHECK(show_json["exit_code"] == 130);

  auto raw = jobs({"logs", job_id, "--step", "1", "--raw"}, &code);
  CHECK(code == 0);
  CHECK(raw.out == "out-line\n");
  CHECK(raw.err == "err-line\n");
  auto replay = jobs({"logs", job_id}, &code);
  CHECK(code == 0);
  CHECK(contains(replay.out, "==> step 1: hello\nout-line\n<== step 'hello' succeeded (exit 0)"));
  CHECK(contains(replay.out, "==> step 2: wait\nwaiting\n"));
  CHECK(contains(replay.out, "(exit code 130)"));
  CHECK_FALSE(contains(replay.out, "should-not-run"));
  auto step_json = jobs({"logs", job_id, "--step", "2", "--json"}, &code);
  CHECK(code == 0);
  auto step_lines = lines_of(step_json.out);
  CHECK(step_lines.size() >= 3);  // started, output, finished
  for (const auto& line : step_lines) {
    auto event = event_from_json_line(line);
    REQUIRE_MESSAGE(event.has_value(), line);
    CHECK((event->has_step_started() || event->has_output() || event->has_step_finished()));
    CHECK(contains(line, "\"step_index\":1,"));
  }

  // What cannot be done, said so.
  auto again = jobs({"cancel", job_id}, &code);
  CHECK(code == 1);
  CHECK(contains(again.err, "has already ended (cancelled)"));
  auto unknown = jobs({"show", "no-such-job", "--json"}, &code);
  CHECK(code == 2);
  CHECK(contains(unknown.err, "no job \"no-such-job\""));
  CHECK(json::parse(unknown.out)["error"]["message"].is_string());
}

}  // TEST_SUITE
