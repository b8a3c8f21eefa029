// Clustered runner end to end: a coordinator, runner nodes and submitters as real
// `solstice-runner` processes on 127.0.0.1, real QEMU and the built test guest on
// TCG. Submitters print with --json so every event they show can be checked:
// numbered 0, 1, 2, ... without a gap or a repeat, exactly one result, last.
#include <doctest/doctest.h>

#include <dirent.h>
#include <signal.h>

#include <chrono>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "runtime/job/event_log.hpp"
#include "solstice.pb.h"
#include "tests/cluster/cluster_process.hpp"

using namespace solstice;
using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// One TCG boot takes 5-40 s on a loaded 2-core host.
constexpr auto job_limit = 420s;

struct Cluster {
  TempDir dir;
  std::optional<RunnerProcess> coordinator;
  std::map<std::string, RunnerProcess> nodes;
  std::string endpoint;
  unsigned connection_timeout = 10;

  void start_coordinator() {
    coordinator.emplace(std::vector<std::string>{
      "coordinator", "--listen", "127.0.0.1:0", "--insecure", "--connection-timeout",
      std::to_string(connection_timeout)});
    auto found = coordinator_endpoint(*coordinator, 20s);
    REQUIRE_MESSAGE(found, coordinator->describe());
    endpoint = *found;
  }

  RunnerProcess& start_node(const std::string& name) {
    auto [i, added] = nodes.emplace(
      name, RunnerProcess{std::vector<std::string>{
              "node", "--join", endpoint, "--insecure", "--name", name, "--slots", "1",
              "--memory-mib", "2048", "--state-dir", (dir.path() / ("state-" + name)).string(),
              "--accel", "tcg", "--connection-timeout", std::to_string(connection_timeout)}});
    auto& node = i->second;
    REQUIRE_MESSAGE(node.wait_for_output("joined the coordinator", 30s), node.describe());
    return node;
  }

  fs::path job_file(const std::string& name, const std::string& json) {
    auto path = dir.path() / (name + ".json");
    write_text(path, json);
    return path;
  }

  RunnerProcess submit(const fs::path& job, bool json = true) {
    std::vector<std::string> args{"submit", "--to", endpoint, "--insecure", job.string()};
    if (json)
      args.push_back("--json");
    return RunnerProcess{args};
  }

  // Ends the nodes and the coordinator the way a service manager would.
  void stop() {
    for (auto& [name, node] : nodes) {
      node.kill(SIGTERM);
      auto status = node.wait_exit(60s);
      CHECK_MESSAGE(status, node.describe());
    }
    if (coordinator) {
      coordinator->kill(SIGTERM);
      CHECK_MESSAGE(coordinator->wait_exit(20s), coordinator->describe());
    }
  }
};

std::string simple_job(const std::string& name, const std::string& script, unsigned retries = 0) {
  std::string quoted;
  for (char c : script) {
    if (c == '"' || c == '\\')
      quoted += '\\';
    quoted += c == '\n' ? std::string{"\\n"} : std::string(1, c);
  }
  return "{\"name\": \"" + name + "\", \"runs_on\": \"solstice-test-guest\", \"retries\": " +
         std::to_string(retries) + ", \"steps\": [{\"name\": \"work\", \"script\": \"" + quoted +
         "\"}]}";
}

// The events a `submit --json` printed, in order.
std::vector<v1::JobEvent> printed_events(const std::string& out) {
  std::vector<v1::JobEvent> events;
  std::istringstream lines{out};
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty() || line.front() != '{')
      continue;
    auto event = event_from_json_line(line);
    REQUIRE_MESSAGE(event, line);
    events.push_back(*event);
  }
  return events;
}

// Every event shown once: sequence numbers 0..n-1 in order, one result, last.
void check_each_event_once(const std::vector<v1::JobEvent>& events, const std::string& context) {
  REQUIRE_MESSAGE(!events.empty(), context);
  for (size_t i = 0; i < events.size(); ++i)
    REQUIRE_MESSAGE(events[i].sequence() == i, "event " << i << " has sequence "
                                                         << events[i].sequence() << "\n"
                                                         << context);
  size_t results = 0;
  for (const auto& event : events)
    results += event.has_result() ? 1 : 0;
  CHECK_MESSAGE(results == 1, context);
  CHECK_MESSAGE(events.back().has_result(), context);
}

std::string stdout_of_steps(const std::vector<v1::JobEvent>& events) {
  std::string text;
  for (const auto& event : events)
    if (event.has_output() && event.output().stream() == v1::STDOUT)
      text += event.output().data();
  return text;
}

std::vector<std::string> notices(const std::vector<v1::JobEvent>& events) {
  std::vector<std::string> out;
  for (const auto& event : events)
    if (event.has_notice())
      out.push_back(event.notice().message());
  return out;
}

// Names of the nodes the job was dispatched to, in order.
std::vector<std::string> dispatched_to(const std::vector<v1::JobEvent>& events) {
  std::vector<std::string> nodes;
  const std::string prefix = "dispatched to node ";
  for (const auto& text : notices(events))
    if (text.rfind(prefix, 0) == 0)
      nodes.push_back(text.substr(prefix.size(), text.find(' ', prefix.size()) - prefix.size()));
  return nodes;
}

bool eventually_no_process_mentions(const std::string& needle, std::chrono::seconds limit) {
  auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    if (!qemu_mentions(needle))
      return true;
    std::this_thread::sleep_for(200ms);
  }
  return false;
}

}  // namespace

TEST_CASE("a coordinator and two one-slot nodes run four jobs spread over both; status shows "
          "nodes, slots and jobs") {
  Cluster cluster;
  cluster.start_coordinator();
  cluster.start_node("node-a");
  cluster.start_node("node-b");

  RunnerProcess status{{"status", "--to", cluster.endpoint, "--insecure"}};
  REQUIRE_MESSAGE(status.wait_exit(30s), status.describe());
  CHECK_MESSAGE(status.exit_code() == 0, status.describe());
  CHECK_MESSAGE(status.out().find("2 node(s), 0 of 2 slot(s) in use") != std::string::npos,
                status.describe());
  CHECK(status.out().find("node-a") != std::string::npos);
  CHECK(status.out().find("node-b") != std::string::npos);
  CHECK(status.out().find("solstice-test-guest") != std::string::npos);

  std::vector<RunnerProcess> submits;
  for (int i = 0; i < 4; ++i) {
    auto job = cluster.job_file("job-" + std::to_string(i),
                                simple_job("job " + std::to_string(i),
                                           "echo marker-of-job-" + std::to_string(i) +
                                             "; sleep 2; echo end-of-job-" + std::to_string(i)));
    submits.push_back(cluster.submit(job));
  }

  // While they run, status shows both slots taken and the jobs on their nodes.
  bool saw_busy = false;
  std::string last_status;
  auto deadline = Clock::now() + 240s;
  while (!saw_busy && Clock::now() < deadline) {
    RunnerProcess busy{{"status", "--to", cluster.endpoint, "--insecure"}};
    busy.wait_exit(30s);
    last_status = busy.out();
    saw_busy = last_status.find("2 of 2 slot(s) in use") != std::string::npos &&
               last_status.find("RUNNING\n") != std::string::npos &&
               last_status.find("(none)\n\nQUEUED") == std::string::npos;
    if (!saw_busy)
      std::this_thread::sleep_for(500ms);
  }
  CHECK_MESSAGE(saw_busy, last_status);

  std::set<std::string> nodes_used;
  for (int i = 0; i < 4; ++i) {
    auto& submit = submits[static_cast<size_t>(i)];
    REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
    CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
    auto events = printed_events(submit.out());
    check_each_event_once(events, submit.describe());
    REQUIRE(events.back().has_result());
    CHECK(events.back().result().status() == v1::SUCCEEDED);
    // Its own output, once, and nobody else's.
    auto output = stdout_of_steps(events);
    auto mine = "marker-of-job-" + std::to_string(i) + "\n";
    CHECK_MESSAGE(output.find(mine) != std::string::npos, output);
    CHECK_MESSAGE(output.find(mine) == output.rfind(mine), output);
    for (int other = 0; other < 4; ++other)
      if (other != i)
        CHECK_MESSAGE(submit.out().find("job-" + std::to_string(other)) == std::string::npos,
                      submit.out());
    auto where = dispatched_to(events);
    REQUIRE_MESSAGE(where.size() == 1, submit.describe());
    nodes_used.insert(where[0]);
    // The job's record is in the state directory of the node that ran it.
    auto record = cluster.dir.path() / ("state-" + where[0]) / "jobs" / events.back().job_id();
    CHECK_MESSAGE(fs::exists(record / "events.jsonl"), record);
    CHECK_MESSAGE(fs::exists(record / "result.json"), record);
  }
  CHECK(nodes_used == std::set<std::string>{"node-a", "node-b"});

  RunnerProcess idle{{"status", "--to", cluster.endpoint, "--insecure"}};
  REQUIRE(idle.wait_exit(30s));
  CHECK_MESSAGE(idle.out().find("0 of 2 slot(s) in use, 0 queued, 0 running") != std::string::npos,
                idle.describe());
  cluster.stop();
  for (auto& [name, node] : cluster.nodes)
    CHECK_MESSAGE(node.exit_code() == 0, node.describe());
}

TEST_CASE("a node SIGKILLed mid-job: its job ends infrastructure_error at once, its VM is gone") {
  Cluster cluster;
  cluster.connection_timeout = 4;
  cluster.start_coordinator();
  cluster.start_node("doomed");
  auto job = cluster.job_file("long", simple_job("long", "echo started-long-step; sleep 300"));
  auto submit = cluster.submit(job, false);
  REQUIRE_MESSAGE(submit.wait_for_output("started-long-step", job_limit), submit.describe());

  cluster.nodes.at("doomed").kill(SIGKILL);
  auto killed_at = Clock::now();
  REQUIRE_MESSAGE(submit.wait_exit(std::chrono::seconds(cluster.connection_timeout + 5)),
                  submit.describe());
  auto took = Clock::now() - killed_at;
  CHECK_MESSAGE(took < std::chrono::seconds(cluster.connection_timeout),
                "the job ended " << std::chrono::duration<double>(took).count()
                                 << " s after the kill");
  CHECK_MESSAGE(submit.exit_code() == 125, submit.describe());
  CHECK_MESSAGE(submit.out().find("node doomed was lost while running the job") != std::string::npos,
                submit.describe());
  CHECK_MESSAGE(submit.out().find("infrastructure error") != std::string::npos, submit.describe());
  // The killed node's QEMU died with it.
  CHECK(eventually_no_process_mentions((cluster.dir.path() / "state-doomed").string(), 10s));

  // The coordinator no longer lists it.
  RunnerProcess status{{"status", "--to", cluster.endpoint, "--insecure"}};
  REQUIRE(status.wait_exit(30s));
  CHECK_MESSAGE(status.out().find("0 node(s)") != std::string::npos, status.describe());
  cluster.nodes.clear();
  cluster.stop();
}

TEST_CASE("a frozen node (SIGSTOP) is lost by missing heartbeats within the connection timeout") {
  Cluster cluster;
  cluster.connection_timeout = 3;
  cluster.start_coordinator();
  auto& node = cluster.start_node("frozen");
  auto job = cluster.job_file("long", simple_job("long", "echo started-long-step; sleep 300"));
  auto submit = cluster.submit(job, false);
  REQUIRE_MESSAGE(submit.wait_for_output("started-long-step", job_limit), submit.describe());

  node.kill(SIGSTOP);
  auto stopped_at = Clock::now();
  auto ended = submit.wait_exit(std::chrono::seconds(cluster.connection_timeout + 10));
  auto took = Clock::now() - stopped_at;
  node.kill(SIGKILL);
  REQUIRE_MESSAGE(ended, submit.describe());
  // Not at once (the connection stays open), but within the timeout plus one
  // heartbeat check.
  CHECK(took >= std::chrono::seconds(cluster.connection_timeout - 1));
  CHECK_MESSAGE(took <= std::chrono::seconds(cluster.connection_timeout + 3),
                "the job ended " << std::chrono::duration<double>(took).count()
                                 << " s after the node froze");
  CHECK_MESSAGE(submit.exit_code() == 125, submit.describe());
  CHECK_MESSAGE(submit.out().find("node frozen was lost while running the job") != std::string::npos,
                submit.describe());
  CHECK(eventually_no_process_mentions((cluster.dir.path() / "state-frozen").string(), 10s));
  cluster.nodes.clear();
  cluster.stop();
}

TEST_CASE("a node lost mid-job with retries: 1: the job is dispatched again once and succeeds, "
          "no event shown twice") {
  Cluster cluster;
  cluster.connection_timeout = 4;
  cluster.start_coordinator();
  cluster.start_node("node-a");
  cluster.start_node("node-b");
  auto job = cluster.job_file(
    "retried", simple_job("retried", "echo running-on-$(hostname); sleep 3; echo retried-ok", 1));
  auto submit = cluster.submit(job);
  // Lose the first node while the VM boots.
  REQUIRE_MESSAGE(submit.wait_for_output("WAITING_FOR_SSH", job_limit), submit.describe());
  auto first = dispatched_to(printed_events(submit.out()));
  REQUIRE(first.size() == 1);
  cluster.nodes.at(first[0]).kill(SIGKILL);

  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  auto events = printed_events(submit.out());
  check_each_event_once(events, submit.describe());
  auto where = dispatched_to(events);
  REQUIRE_MESSAGE(where.size() == 2, submit.describe());
  CHECK(where[0] == first[0]);
  CHECK(where[1] != first[0]);
  bool told = false;
  for (const auto& text : notices(events))
    told |= text.find("node " + first[0] + " was lost") != std::string::npos &&
            text.find("attempt 2 of 2") != std::string::npos;
  CHECK_MESSAGE(told, submit.describe());
  CHECK(events.back().result().status() == v1::SUCCEEDED);
  CHECK(stdout_of_steps(events).find("retried-ok") != std::string::npos);
  cluster.nodes.erase(first[0]);
  cluster.stop();
}

TEST_CASE("a node rejoins a coordinator that restarted, with backoff") {
  Cluster cluster;
  cluster.start_coordinator();
  auto& node = cluster.start_node("steady");
  cluster.coordinator->kill(SIGKILL);
  cluster.coordinator->wait_exit(10s);
  REQUIRE_MESSAGE(node.wait_for_output("lost the coordinator", 15s), node.describe());
  // While nobody listens, the node keeps trying and says so.
  CHECK_MESSAGE(node.wait_for_output("retrying in", 10s), node.describe());

  cluster.coordinator.emplace(std::vector<std::string>{"coordinator", "--listen", cluster.endpoint,
                                                        "--insecure"});
  REQUIRE_MESSAGE(coordinator_endpoint(*cluster.coordinator, 20s), cluster.coordinator->describe());
  auto deadline = Clock::now() + 60s;
  auto joins = [&] {
    const auto& out = node.out();
    size_t count = 0;
    for (auto at = out.find("joined the coordinator"); at != std::string::npos;
         at = out.find("joined the coordinator", at + 1))
      ++count;
    return count;
  };
  while (joins() < 2 && Clock::now() < deadline)
    std::this_thread::sleep_for(200ms);
  CHECK_MESSAGE(joins() == 2, node.describe());
  RunnerProcess status{{"status", "--to", cluster.endpoint, "--insecure"}};
  REQUIRE(status.wait_exit(30s));
  CHECK_MESSAGE(status.out().find("steady") != std::string::npos, status.describe());
  cluster.stop();
}

TEST_CASE("queued jobs: one no node can take ends within the queue timeout; Ctrl-C cancels one") {
  Cluster cluster;
  cluster.coordinator.emplace(std::vector<std::string>{
    "coordinator", "--listen", "127.0.0.1:0", "--insecure", "--queue-timeout", "2"});
  auto found = coordinator_endpoint(*cluster.coordinator, 20s);
  REQUIRE_MESSAGE(found, cluster.coordinator->describe());
  cluster.endpoint = *found;

  auto job = cluster.job_file("nowhere", simple_job("nowhere", "true"));
  auto waiting = cluster.submit(job, false);
  REQUIRE_MESSAGE(waiting.wait_exit(20s), waiting.describe());
  CHECK_MESSAGE(waiting.exit_code() == 125, waiting.describe());
  CHECK_MESSAGE(waiting.out().find("no node offers runs_on 'solstice-test-guest' yet") !=
                  std::string::npos,
                waiting.describe());
  CHECK(waiting.out().find("no node could take the job within 2 s") != std::string::npos);

  // A longer queue timeout, and the submitter interrupted while it waits.
  cluster.coordinator->kill(SIGTERM);
  cluster.coordinator->wait_exit(20s);
  cluster.start_coordinator();
  auto cancelled = cluster.submit(job, false);
  REQUIRE_MESSAGE(cancelled.wait_for_output("position 1 in the cluster queue", 20s),
                  cancelled.describe());
  cancelled.kill(SIGINT);
  REQUIRE_MESSAGE(cancelled.wait_exit(20s), cancelled.describe());
  CHECK_MESSAGE(cancelled.exit_code() == 130, cancelled.describe());
  CHECK(cancelled.out().find("cancelled while queued") != std::string::npos);
  RunnerProcess status{{"status", "--to", cluster.endpoint, "--insecure"}};
  REQUIRE(status.wait_exit(30s));
  CHECK_MESSAGE(status.out().find("0 queued, 0 running") != std::string::npos, status.describe());
  cluster.stop();
}

TEST_CASE("follow shows a running job from then on, like submit, and exits with the job's exit "
          "code; an unknown job is invalid input") {
  Cluster cluster;
  cluster.start_coordinator();
  cluster.start_node("node-a");
  auto job = cluster.job_file(
    "followed", R"({"id": "followed-job", "name": "followed", "runs_on": "solstice-test-guest",
      "steps": [{"name": "work", "script": "echo step-begins; sleep 25; echo followed-output; exit 3"}]})");
  auto submit = cluster.submit(job, false);
  REQUIRE_MESSAGE(submit.wait_for_output("step-begins", job_limit), submit.describe());

  RunnerProcess follow{{"follow", "--coordinator", cluster.endpoint, "--insecure", "followed-job"}};
  REQUIRE_MESSAGE(follow.wait_exit(180s), follow.describe());
  CHECK_MESSAGE(follow.exit_code() == 3, follow.describe());
  CHECK(follow.out().find("following job followed-job") != std::string::npos);
  CHECK_MESSAGE(follow.out().find("followed-output") != std::string::npos, follow.describe());
  // From then on: what came before it attached is not shown again.
  CHECK(follow.out().find("step-begins") == std::string::npos);
  REQUIRE_MESSAGE(submit.wait_exit(60s), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 3, submit.describe());

  RunnerProcess unknown{{"follow", "--coordinator", cluster.endpoint, "--insecure", "no-such-job"}};
  REQUIRE_MESSAGE(unknown.wait_exit(60s), unknown.describe());
  CHECK_MESSAGE(unknown.exit_code() == 2, unknown.describe());
  CHECK_MESSAGE(unknown.err().find("no job no-such-job") != std::string::npos, unknown.describe());
  cluster.stop();
}
