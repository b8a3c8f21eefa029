// `solstice-runner run a.json b.json`: several jobs at once in one runner
// process, on the built test guest under TCG. Asserts each job's result and
// record, that every output line carries its job's prefix and is never mixed with
// another job's, the exit-code rule, Ctrl-C cancelling every job, and that one
// invalid file runs nothing.
#include <doctest/doctest.h>

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/util/json_util.h>
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

// Two TCG boots at once on a loaded 2-core host; the jobs must end well within this.
constexpr auto run_limit = 400s;

fs::path runner_binary() { return fs::path(SOLSTICE_BINARY_DIR) / "solstice-runner"; }

struct RunnerRun {
  std::optional<ExitStatus> status;  // nullopt: still running at the limit (then killed)
  std::string out, err;
  int exit_code() const { return status && !status->signaled ? status->code : -1; }
  std::string describe() const {
    return (status ? status->describe() : std::string("no exit within the limit")) +
           "\n--- stdout (tail) ---\n" + out.substr(out.size() > 4000 ? out.size() - 4000 : 0) +
           "\n--- stderr (tail) ---\n" + err.substr(err.size() > 3000 ? err.size() - 3000 : 0);
  }
};

using OutputWatch = std::function<void(pid_t runner_pid, const std::string& out)>;

void drain_pipe(int fd, std::string& into, bool& open) {
  char buffer[65536];
  while (open) {
    ssize_t n = ::read(fd, buffer, sizeof buffer);
    if (n > 0)
      into.append(buffer, static_cast<size_t>(n));
    else if (n == 0)
      open = false;
    else if (errno == EINTR)
      continue;
    else {
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        open = false;
      return;
    }
  }
}

// Runs solstice-runner with `args`, reading both pipes while it runs; killed by
// its PID if still running at the limit.
RunnerRun run_runner(const std::vector<std::string>& args, const OutputWatch& watch = {}) {
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
    auto before = run.out.size();
    drain_pipe(child->stdout_fd(), run.out, out_open);
    drain_pipe(child->stderr_fd(), run.err, err_open);
    if (watch && run.out.size() != before && !exited_at)
      watch(child->pid(), run.out);
    if (!run.status && (run.status = child->try_wait()))
      exited_at = Clock::now();
    if (exited_at && ((!out_open && !err_open) || Clock::now() - *exited_at > 10s))
      break;
    if (!exited_at && Clock::now() - started > run_limit) {
      child->kill(SIGKILL);
      child->wait_for(10s);
      break;
    }
  }
  return run;
}

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

bool starts_with(const std::string& text, const std::string& start) {
  return text.rfind(start, 0) == 0;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    lines.push_back(line);
  return lines;
}

struct Workspace {
  TempDir temp;
  fs::path state_dir;

  Workspace() {
    auto made = TempDir::make("solstice-run-many-test-");
    REQUIRE_MESSAGE(made.has_value(), why(made));
    temp = std::move(*made);
    state_dir = temp.path() / "state";
    ::setenv("SOLSTICE_TEST_GUEST_DIR", SOLSTICE_TEST_GUEST_DIR, 0);
  }

  fs::path write_job(const std::string& file_name, const json& job) const {
    auto path = temp.path() / file_name;
    write_file(path, job.dump(2));
    return path;
  }

  std::vector<std::string> args(const std::vector<fs::path>& job_files) const {
    std::vector<std::string> all{"run"};
    for (const auto& file : job_files)
      all.push_back(file.string());
    // Cold boots (restored jobs: test_templates.cpp).
    for (std::string extra : {"--cold", "--accel", "tcg", "--state-dir"})
      all.push_back(extra);
    all.push_back(state_dir.string());
    return all;
  }
};

struct JobRecord {
  v1::JobResult result;
  std::vector<v1::JobEvent> events;
};

JobRecord load_record(const Workspace& ws, const std::string& job_id) {
  JobRecord record;
  auto dir = ws.state_dir / "jobs" / job_id;
  auto events = read_event_log(dir / "events.jsonl");
  REQUIRE_MESSAGE(events.has_value(), why(events));
  record.events = std::move(*events);
  auto text = read_file(dir / "result.json");
  REQUIRE_MESSAGE(!text.empty(), "no result.json in " << dir.string());
  auto parsed = google::protobuf::util::JsonStringToMessage(text, &record.result);
  REQUIRE_MESSAGE(parsed.ok(), "result.json: " << parsed.ToString());
  return record;
}

// The first event of `state`, and of the result, in microseconds.
int64_t state_time(const JobRecord& record, v1::JobState state) {
  for (const auto& event : record.events)
    if (event.has_state() && event.state().state() == state)
      return event.timestamp_us();
  return -1;
}
int64_t result_time(const JobRecord& record) {
  return record.events.empty() ? -1 : record.events.back().timestamp_us();
}

// No process for this state directory and no VM work files are left.
void check_nothing_left(const Workspace& ws) {
  auto processes = processes_mentioning(ws.state_dir.string());
  std::string listing;
  for (const auto& p : processes)
    listing += "\n  " + p;
  CHECK_MESSAGE(processes.empty(), "processes left for this state dir:" << listing);
  std::error_code ec;
  auto run_dir = ws.state_dir / "run";
  std::string left;
  for (const auto& entry : fs::recursive_directory_iterator(run_dir, ec))
    left += "\n  " + entry.path().string();
  CHECK_MESSAGE(left.empty(), "left in " << run_dir.string() << ":" << left);
}

// A step printing `count` numbered lines, each written in three pieces, then a
// line that waits a second between its halves (the first half reaches the
// runner as a chunk of its own), then 100000 bytes without any newline.
std::string chatty_script(const std::string& who, int count) {
  return "i=0; while [ $i -lt " + std::to_string(count) + " ]; do i=$((i+1)); printf '" + who +
         " %04d' $i; printf ' middle'; printf ' end\\n'; done\n"
         "printf '" + who + " first half'; sleep 1; printf ' second half\\n'\n"
         "head -c 100000 /dev/zero | tr '\\0' " + who.substr(0, 1) + "\n";
}

}  // namespace

TEST_SUITE("run_many") {

TEST_CASE("two job files in one process: prefixed whole lines, both results, the failing job's exit code") {
  Workspace ws;
  constexpr int count = 400;
  auto alpha = ws.write_job("alpha.json", {
    {"id", "many-alpha"},
    {"name", "alpha"},
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({{{"name", "talk"}, {"script", chatty_script("alpha", count)}}})},
  });
  auto beta = ws.write_job("beta.json", {
    {"id", "many-beta"},
    {"name", "beta"},
    {"runs_on", "solstice-test-guest"},
    {"steps", json::array({
                {{"name", "talk"}, {"script", chatty_script("beta", count)}},
                {{"name", "fail"}, {"script", "echo failing >&2; exit 3"}},
                {{"name", "never"}, {"script", "echo should-not-run"}},
              })},
  });
  auto run = run_runner(ws.args({alpha, beta}));
  INFO(run.describe());
  // The first job succeeded, the second failed with 3: the run's code is 3.
  CHECK(run.exit_code() == 3);

  auto alpha_record = load_record(ws, "many-alpha");
  auto beta_record = load_record(ws, "many-beta");
  CHECK(alpha_record.result.status() == v1::SUCCEEDED);
  CHECK(alpha_record.result.exit_code() == 0);
  CHECK(beta_record.result.status() == v1::FAILED);
  CHECK(beta_record.result.exit_code() == 3);
  REQUIRE(beta_record.result.steps_size() == 3);
  CHECK(beta_record.result.steps(2).outcome() == v1::STEP_SKIPPED);
  for (const auto* record : {&alpha_record, &beta_record})
    for (const auto& event : record->events)
      CHECK(event.job_id() == record->result.job_id());
  // Both VMs were up at the same time (max_concurrent_vms is 2 by default).
  auto alpha_boot = state_time(alpha_record, v1::BOOTING);
  auto beta_boot = state_time(beta_record, v1::BOOTING);
  CHECK(alpha_boot > 0);
  CHECK(beta_boot > 0);
  CHECK(alpha_boot < result_time(beta_record));
  CHECK(beta_boot < result_time(alpha_record));

  // stdout: every line carries one job's prefix, until the overview at the end.
  auto lines = lines_of(run.out);
  size_t overview = lines.size();
  for (size_t i = 0; i < lines.size(); ++i)
    if (contains(lines[i], " jobs: ") && !starts_with(lines[i], "[")) {
      overview = i;
      break;
    }
  REQUIRE_MESSAGE(overview < lines.size(), "no overview at the end");
  std::vector<std::string> alpha_talk, beta_talk;
  std::string alpha_x, beta_x;
  int bad_lines = 0;
  for (size_t i = 0; i + 1 < overview; ++i) {
    const auto& line = lines[i];
    bool is_alpha = starts_with(line, "[alpha] "), is_beta = starts_with(line, "[beta] ");
    if (!is_alpha && !is_beta) {
      if (++bad_lines <= 5)
        FAIL_CHECK("a line without a job prefix: " << line.substr(0, 200));
      continue;
    }
    auto text = line.substr(is_alpha ? 8 : 7);
    const std::string other = is_alpha ? "beta" : "alpha";
    CHECK_MESSAGE(!contains(text, "[" + other + "]"), "mixed line: " << line.substr(0, 200));
    if (starts_with(text, "alpha ") || starts_with(text, "beta "))
      (is_alpha ? alpha_talk : beta_talk).push_back(text);
    else if (!text.empty() && text.find_first_not_of(is_alpha ? 'a' : 'b') == std::string::npos)
      (is_alpha ? alpha_x : beta_x) += text + "|";
  }
  CHECK(lines[overview - 1].empty());
  for (auto [who, talk] : {std::pair{std::string("alpha"), alpha_talk},
                           std::pair{std::string("beta"), beta_talk}}) {
    INFO(who);
    REQUIRE(talk.size() == count + 1);
    for (int i = 0; i < count; ++i) {
      char expected[64];
      std::snprintf(expected, sizeof expected, "%s %04d middle end", who.c_str(), i + 1);
      CHECK(talk[i] == expected);
    }
    // The line written in two halves a second apart arrives whole.
    CHECK(talk[count] == who + " first half second half");
  }
  // 100000 bytes without a newline: a 64 KiB line, then the rest at the step's end.
  CHECK(alpha_x == std::string(65536, 'a') + "|" + std::string(100000 - 65536, 'a') + "|");
  CHECK(beta_x == std::string(65536, 'b') + "|" + std::string(100000 - 65536, 'b') + "|");
  // Status lines and each job's summary carry the prefix too.
  CHECK(contains(run.out, "[alpha] job many-alpha: alpha\n"));
  CHECK(std::any_of(lines.begin(), lines.end(), [](const std::string& line) {
    return starts_with(line, "[beta] [") && contains(line, "] ==> step 2/3: fail");
  }));
  CHECK(contains(run.out, "[alpha] job many-alpha succeeded"));
  CHECK(contains(run.out, "[beta] job many-beta failed"));
  CHECK_FALSE(contains(run.out, "should-not-run"));
  CHECK(contains(run.err, "[beta] failing\n"));

  // The overview: one line per job, in command-line order, and where the code came from.
  REQUIRE(lines.size() >= overview + 3);
  CHECK(contains(lines[overview], "2 jobs: 1 succeeded, 1 did not; exit code 3 from beta"));
  CHECK(starts_with(lines[overview + 1], "  [alpha]"));
  CHECK(contains(lines[overview + 1], "succeeded"));
  CHECK(contains(lines[overview + 1], "exit 0"));
  CHECK(starts_with(lines[overview + 2], "  [beta]"));
  CHECK(contains(lines[overview + 2], "failed"));
  CHECK(contains(lines[overview + 2], "exit 3"));
  check_nothing_left(ws);
}

TEST_CASE("Ctrl-C cancels every job of the run") {
  Workspace ws;
  auto job = [](const std::string& who) {
    return json{{"name", who},
                {"runs_on", "solstice-test-guest"},
                {"steps", json::array({{{"name", "long"},
                                        {"script", "echo started-" + who + "; sleep 600"}}})}};
  };
  auto one = ws.write_job("one.json", job("one"));
  auto two = ws.write_job("two.json", job("two"));
  std::optional<Clock::time_point> interrupted;
  auto run = run_runner(ws.args({one, two}), [&](pid_t pid, const std::string& out) {
    if (!interrupted && contains(out, "[one] started-one\n") &&
        contains(out, "[two] started-two\n")) {
      ::kill(pid, SIGINT);
      interrupted = Clock::now();
    }
  });
  auto ended = Clock::now();
  INFO(run.describe());
  REQUIRE(interrupted.has_value());
  CHECK(run.exit_code() == 130);
  CHECK(ended - *interrupted < 60s);
  CHECK(contains(run.err, "cancelling the jobs"));
  std::vector<std::string> ids;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(ws.state_dir / "jobs", ec))
    ids.push_back(entry.path().filename().string());
  REQUIRE(ids.size() == 2);
  for (const auto& id : ids) {
    auto record = load_record(ws, id);
    std::string console;
    for (const auto& line : record.result.console_tail()) console += line + "\n";
    INFO("console of " << id << ":\n" << console);
    CHECK(record.result.status() == v1::CANCELLED);
    CHECK(record.result.exit_code() == 130);
    // Each VM was asked to power off. Whether a guest obeys within the grace
    // period is the guest's business (under a loaded host it may not): then the
    // runner quits QEMU and says so.
    auto noticed = [&](const std::string& text) {
      for (const auto& event : record.events)
        if (event.has_notice() && contains(event.notice().message(), text))
          return true;
      return false;
    };
    CHECK(noticed("QMP event POWERDOWN"));
    if (record.result.shutdown_method() != "powerdown") {
      CHECK(record.result.shutdown_method() == "quit");
      CHECK(noticed("the guest did not power off in time; quitting QEMU"));
    }
  }
  CHECK(contains(run.out, "2 jobs: 0 succeeded, 2 did not; exit code 130 from one"));
  check_nothing_left(ws);
}

TEST_CASE("one invalid job file: exit 2 naming it, and no job starts") {
  Workspace ws;
  auto good = ws.write_job("good.json", {{"name", "good"},
                                         {"runs_on", "solstice-test-guest"},
                                         {"steps", json::array({{{"script", "true"}}})}});
  auto check_nothing_started = [&](const RunnerRun& run) {
    CHECK_FALSE(contains(run.out, "booting"));
    CHECK_FALSE(contains(run.out, "record:"));
    auto jobs = ws.state_dir / "jobs";
    CHECK((!fs::exists(jobs) || fs::is_empty(jobs)));
    check_nothing_left(ws);
  };

  SUBCASE("a runs_on label nobody configured, in the second file") {
    auto bad = ws.write_job("bad-label.json", {{"runs_on", "no-such-label"},
                                               {"steps", json::array({{{"script", "true"}}})}});
    auto run = run_runner(ws.args({good, bad}));
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(contains(run.err, bad.string() + ": "));
    CHECK(contains(run.err, "no-such-label"));
    CHECK_FALSE(contains(run.err, good.string()));
    check_nothing_started(run);
  }
  SUBCASE("malformed JSON in the second file") {
    auto bad = ws.temp.path() / "broken.json";
    write_file(bad, "{ \"steps\": [ ,, ] }\n");
    auto run = run_runner(ws.args({good, bad}));
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(contains(run.err, "broken.json:1:"));
    check_nothing_started(run);
  }
  SUBCASE("a second file that does not exist") {
    auto run = run_runner(ws.args({good, ws.temp.path() / "missing.json"}));
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(contains(run.err, "missing.json"));
    check_nothing_started(run);
  }
  SUBCASE("two files with one job id") {
    json same{{"id", "same-id"},
              {"runs_on", "solstice-test-guest"},
              {"steps", json::array({{{"script", "true"}}})}};
    auto first = ws.write_job("first.json", same);
    auto second = ws.write_job("second.json", same);
    auto run = run_runner(ws.args({first, second}));
    INFO(run.describe());
    CHECK(run.exit_code() == 2);
    CHECK(contains(run.err, "same-id"));
    CHECK(contains(run.err, second.string()));
    check_nothing_started(run);
  }
}

}  // TEST_SUITE
