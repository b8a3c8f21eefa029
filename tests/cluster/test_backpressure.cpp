// Back-pressure through the cluster (node -> coordinator -> submitter), with real
// coordinator, node and submitter processes on 127.0.0.1 and the real test guest:
// a submitter that stops reading its terminal stops acknowledging output, and
// the acknowledgement that does not come holds the step in the guest instead of
// piling its output up in the node, the coordinator or the submitter. A step
// whose output is held still ends at its timeout.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "tests/cluster/cluster_process.hpp"

using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// The resident memory of a process, from /proc/<pid>/status (VmRSS), in KiB.
std::optional<uint64_t> rss_kib(pid_t pid) {
  std::ifstream status{"/proc/" + std::to_string(pid) + "/status"};
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0)
      return std::stoull(line.substr(6));
  return std::nullopt;
}

uint64_t file_size_or_zero(const fs::path& path) {
  std::error_code ec;
  auto size = fs::file_size(path, ec);
  return ec ? 0 : size;
}

// A submitter whose output the test reads only when it says so (pump, out,
// wait_*): until then its terminal is a full pipe.
RunnerProcess submit_held(OneNodeCluster& cluster, const std::string& name,
                          const std::string& json) {
  auto path = cluster.dir.path() / (name + ".json");
  write_text(path, json);
  return cluster.submit(path);
}

// The node's and the coordinator's logs are read on (they must not block on them).
void pump_services(OneNodeCluster& cluster) {
  cluster.node->pump();
  cluster.coordinator.pump();
}

std::string seq_output(unsigned last) {
  std::string text;
  text.reserve(size_t{last} * 8);
  for (unsigned i = 1; i <= last; ++i)
    text += std::to_string(i) + "\n";
  return text;
}

}  // namespace

TEST_CASE("a submitter that stops reading holds a flood in the guest: node, coordinator and "
          "submitter memory stay bounded, and the flood arrives whole and in order once it reads "
          "again") {
  OneNodeCluster cluster;
  // About 63 MB of numbered lines.
  constexpr unsigned last_line = 8000000;
  const uint64_t flood_bytes = seq_output(last_line).size();
  auto submitter = submit_held(
    cluster, "flood", R"({"id": "bp-flood", "name": "flood", "runs_on": "solstice-test-guest",
      "timeout_seconds": 3000, "steps": [{"name": "flood", "script": "seq 1 )" +
               std::to_string(last_line) + R"("}]})");
  REQUIRE(submitter.started());

  // The node records the job's events as they come (its own sink, paced like
  // the others): output recorded means the flood has begun.
  const auto events = cluster.state / "jobs" / "bp-flood" / "events.jsonl";
  auto deadline = Clock::now() + 420s;
  while (file_size_or_zero(events) < (1u << 20) && Clock::now() < deadline) {
    pump_services(cluster);
    std::this_thread::sleep_for(200ms);
  }
  REQUIRE_MESSAGE(file_size_or_zero(events) >= (1u << 20),
                  "the flood did not begin\n" << cluster.node->describe());

  // The submitter reads nothing for 70 s: longer than three acknowledgement
  // windows (20 s each), so each hop asks again while it is held.
  std::map<std::string, pid_t> pids{{"node", cluster.node->pid()},
                                    {"coordinator", cluster.coordinator.pid()},
                                    {"submitter", submitter.pid()}};
  std::map<std::string, uint64_t> baseline, peak;
  for (const auto& [who, pid] : pids) {
    auto rss = rss_kib(pid);
    REQUIRE_MESSAGE(rss, who << " is gone");
    baseline[who] = peak[who] = *rss;
  }
  const auto hold_until = Clock::now() + 70s;
  uint64_t recorded_during_hold = 0;
  while (Clock::now() < hold_until) {
    pump_services(cluster);
    for (const auto& [who, pid] : pids)
      if (auto rss = rss_kib(pid))
        peak[who] = std::max(peak[who], *rss);
    recorded_during_hold = file_size_or_zero(events);
    std::this_thread::sleep_for(500ms);
  }
  // Held at the source: the job's record (written at the pace of the slowest
  // sink) got about the 4 MiB window of the flood (base64 in JSON: about 6 MB),
  // and no more for each 20 s window the submitter did not answer in.
  MESSAGE("events.jsonl after the hold: " << recorded_during_hold << " bytes of a "
                                          << flood_bytes << "-byte flood");
  CHECK(recorded_during_hold < (9u << 20));
  // Each process's memory grew by far less than the flood.
  const uint64_t bound_kib = 24 * 1024;
  for (const auto& [who, pid] : pids) {
    MESSAGE(who << " RSS: " << baseline[who] << " KiB when the flood began, at most "
                << peak[who] << " KiB while held");
    CHECK_MESSAGE(peak[who] - baseline[who] < bound_kib,
                  who << "'s RSS grew by " << (peak[who] - baseline[who]) << " KiB");
  }

  // Reading again: every byte comes, in order, and the job succeeds.
  REQUIRE_MESSAGE(submitter.wait_exit(1200s), "the submitter did not finish");
  CHECK_MESSAGE(submitter.exit_code() == 0, submitter.describe());
  const auto& out = submitter.out();
  CHECK_MESSAGE(out.find(seq_output(last_line)) != std::string::npos,
                "the flood did not arrive whole and in order (" << out.size()
                                                                << " bytes of stdout)");
}

TEST_CASE("a step whose output nobody acknowledges still ends at its step timeout, and its VM "
          "is cleaned up") {
  OneNodeCluster cluster;
  auto submitter = submit_held(
    cluster, "endless", R"({"id": "bp-timeout", "name": "endless", "runs_on": "solstice-test-guest",
      "steps": [{"name": "endless", "script": "yes held-output", "timeout_seconds": 40}]})");
  REQUIRE(submitter.started());

  // The submitter reads nothing; the node reports the job's end regardless.
  const std::string finished = "job bp-timeout finished on node node-1: TIMED_OUT";
  auto deadline = Clock::now() + 480s;
  while (cluster.node->err().find(finished) == std::string::npos && Clock::now() < deadline) {
    cluster.coordinator.pump();
    std::this_thread::sleep_for(500ms);
  }
  REQUIRE_MESSAGE(cluster.node->err().find(finished) != std::string::npos,
                  cluster.node->describe());
  CHECK(!submitter.status());

  // The VM is gone with its files, while the submitter still has not read.
  auto gone_by = Clock::now() + 60s;
  while ((qemu_mentions(cluster.state.string()) || fs::exists(cluster.state / "run" / "bp-timeout")) &&
         Clock::now() < gone_by)
    std::this_thread::sleep_for(200ms);
  CHECK_FALSE(qemu_mentions(cluster.state.string()));
  CHECK_FALSE(fs::exists(cluster.state / "run" / "bp-timeout"));

  // Reading again: the output so far, then the usual timeout result.
  REQUIRE_MESSAGE(submitter.wait_exit(600s), "the submitter did not finish");
  CHECK_MESSAGE(submitter.exit_code() == 124, submitter.describe());
  CHECK(submitter.out().find("held-output\nheld-output\n") != std::string::npos);
  CHECK_MESSAGE(submitter.out().find("timed out") != std::string::npos, submitter.describe());
}
