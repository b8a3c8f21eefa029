// A job's record is its own: a second runner given the id of a running job is
// refused before it touches anything, a finished id only with --replace; and the
// console.log in the record has secrets hidden like all other output, with no raw
// capture left once the job is over. Real runner processes on the real test guest.
#include <doctest/doctest.h>

#include <chrono>
#include <fstream>
#include <iterator>
#include <set>

#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
namespace v1 = solstice::v1;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

constexpr auto boot_allowance = 300s;

std::string file_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

std::set<std::string> names_in(const fs::path& dir) {
  std::set<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    names.insert(it->path().filename().string());
  return names;
}

// Every file under `dir` whose content holds `text`.
std::vector<fs::path> files_holding(const fs::path& dir, const std::string& text) {
  std::vector<fs::path> found;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
    if (it->is_regular_file(ec) && contains(file_text(it->path()), text))
      found.push_back(it->path());
  return found;
}

// Events numbered from the start without gaps or repeats, with one result, the
// last: nothing of another run mixed in.
void check_one_run(const std::vector<v1::JobEvent>& events) {
  REQUIRE_FALSE(events.empty());
  CHECK(events[0].sequence() <= 1);
  int results = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    CHECK(events[i].sequence() == events[0].sequence() + i);
    results += events[i].has_result();
  }
  CHECK(results == 1);
  CHECK(events.back().has_result());
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("a second runner with a running job's id is refused; the first finishes untouched") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "claimed";
  auto job = sandbox.write_json("job.json",
                                guest_job(id, {"echo step-started; sleep 3; echo first-done"}));
  auto first = Runner::start(sandbox.run_args(job, "tcg"));
  REQUIRE_MESSAGE(first.wait_until([&] { return contains(sandbox.step_output(id, 0), "step-started"); },
                                   boot_allowance),
                  first.output());
  const auto work_files = names_in(sandbox.work_dir(id));
  const auto console_before = file_text(sandbox.job_dir(id) / "console.log");
  const auto events_before = file_text(sandbox.job_dir(id) / "events.jsonl");
  REQUIRE(work_files.count("owner.json"));
  REQUIRE_FALSE(console_before.empty());

  for (std::vector<std::string> extra : {std::vector<std::string>{}, {"--replace"}}) {
    auto second = run_to_end(sandbox.run_args(job, "tcg", {}, extra), 60s);
    REQUIRE_MESSAGE(second.exited(), second.output());
    INFO(second.output());
    CHECK(second.wait(0ms)->code == 2);
    CHECK(contains(second.err(), "job id \"" + id + "\" is in use by a job that is running now"));
    // It touched nothing: the running job's files are all there, nothing truncated.
    CHECK(names_in(sandbox.work_dir(id)) == work_files);
    CHECK(file_text(sandbox.job_dir(id) / "console.log").rfind(console_before, 0) == 0);
    CHECK(file_text(sandbox.job_dir(id) / "events.jsonl").rfind(events_before, 0) == 0);
  }

  auto status = first.wait(120s);
  REQUIRE_MESSAGE(status, first.output());
  INFO(first.output());
  CHECK(status->code == 0);
  auto result = sandbox.result(id);
  REQUIRE(result);
  CHECK(result->status() == v1::SUCCEEDED);
  CHECK(contains(sandbox.step_output(id, 0), "first-done"));
  check_one_run(sandbox.events(id));
  CHECK(contains(file_text(sandbox.job_dir(id) / "console.log"), "SOLSTICE-GUEST: sshd started"));

  // Finished now: the id is still taken (a rerun would mix with the old record).
  const auto finished_events = file_text(sandbox.job_dir(id) / "events.jsonl");
  auto again = run_to_end(sandbox.run_args(job, "tcg"), 60s);
  REQUIRE_MESSAGE(again.exited(), again.output());
  CHECK(again.wait(0ms)->code == 2);
  CHECK(contains(again.err(), "has a record already"));
  CHECK(contains(again.err(), "--replace"));
  CHECK(file_text(sandbox.job_dir(id) / "events.jsonl") == finished_events);
  check_nothing_left(sandbox);
}

TEST_CASE("a secret a step writes to /dev/console is *** in console.log; no raw capture stays") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  const std::string id = "console-secret";
  const std::string secret = "hunter2-console-4711";
  auto spec = guest_job(id, {"echo \"leak=$TOKEN\" > /dev/console; echo console-written"});
  spec["secrets"] = {{"TOKEN", secret}};
  auto job = sandbox.write_json("job.json", spec);
  auto runner = run_to_end(sandbox.run_args(job, "tcg"), boot_allowance);
  REQUIRE_MESSAGE(runner.exited(), runner.output());
  INFO(runner.output());
  CHECK(runner.wait(0ms)->code == 0);
  CHECK(contains(sandbox.step_output(id, 0), "console-written"));

  auto console = file_text(sandbox.job_dir(id) / "console.log");
  CHECK(contains(console, "SOLSTICE-GUEST: sshd started"));  // the boot, live part
  CHECK(contains(console, "leak=***"));                     // after the hand-off
  CHECK_FALSE(contains(console, secret));
  CHECK(mode_of(sandbox.job_dir(id) / "console.log") == 0600);
  // No file of the state directory holds it: the raw capture went with the VM.
  CHECK(files_holding(sandbox.state(), secret).empty());
  CHECK_FALSE(fs::exists(sandbox.work_dir(id)));
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
