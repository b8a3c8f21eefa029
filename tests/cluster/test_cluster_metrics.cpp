// Metrics, health and logs of the cluster roles: a coordinator and a node, both
// with --metrics-listen and JSON logs, run one submitted job on the test guest.
// Afterwards each one's /metrics counts the job and shows its slot free again,
// /healthz answers 200, and the node's log has a line per job started and
// finished, each carrying the job's id.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "tests/cluster/cluster_process.hpp"

using namespace solstice::cluster_testing;
using namespace std::chrono_literals;

namespace {

std::string http_get(int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval timeout{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  std::string response;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
    const std::string request = "GET " + path + " HTTP/1.0\r\n\r\n";
    if (::write(fd, request.data(), request.size()) == ssize_t(request.size())) {
      char buffer[4096];
      ssize_t got;
      while ((got = ::read(fd, buffer, sizeof buffer)) > 0)
        response.append(buffer, size_t(got));
    }
  }
  ::close(fd);
  return response;
}

// The port a process logged for its metrics, 0 when it did not (yet).
int metrics_port(RunnerProcess& process) {
  static const std::regex logged(R"(metrics on http://127\.0\.0\.1:([0-9]+)/metrics)");
  std::smatch match;
  const std::string err = process.err();
  return std::regex_search(err, match, logged) ? std::stoi(match[1]) : 0;
}

// "name{labels}" -> value of the samples of a text exposition.
std::map<std::string, double> samples_of(const std::string& response) {
  std::map<std::string, double> samples;
  std::istringstream lines(response.substr(response.find("\r\n\r\n") + 4));
  std::string line;
  while (std::getline(lines, line))
    if (!line.empty() && line[0] != '#')
      samples[line.substr(0, line.rfind(' '))] = std::stod(line.substr(line.rfind(' ') + 1));
  return samples;
}

}  // namespace

TEST_CASE("cluster metrics and logs: coordinator and node count a job, answer /healthz; the "
          "node logs the job started and finished with its id") {
  TempDir dir;
  RunnerProcess coordinator{{"coordinator", "--listen", "127.0.0.1:0", "--insecure",
                             "--metrics-listen", "127.0.0.1:0", "--log-format", "json"}};
  auto endpoint = coordinator_endpoint(coordinator, 20s);
  REQUIRE_MESSAGE(endpoint, coordinator.describe());
  RunnerProcess node{{"node", "--join", *endpoint, "--insecure", "--name", "metrics-node",
                      "--slots", "1", "--memory-mib", "2048", "--state-dir",
                      (dir.path() / "state").string(), "--accel", "tcg", "--metrics-listen",
                      "127.0.0.1:0", "--log-format", "json"}};
  REQUIRE_MESSAGE(node.wait_for_output("joined the coordinator", 30s), node.describe());
  const int coordinator_port = metrics_port(coordinator);
  const int node_port = metrics_port(node);
  REQUIRE_MESSAGE(coordinator_port > 0, coordinator.describe());
  REQUIRE_MESSAGE(node_port > 0, node.describe());

  write_text(dir.path() / "job.json",
             R"({"name": "metrics", "runs_on": "solstice-test-guest",
                 "steps": [{"name": "work", "script": "echo counted"}]})");
  RunnerProcess submit{{"submit", "--to", *endpoint, "--insecure",
                        (dir.path() / "job.json").string()}};
  auto ended = submit.wait_exit(420s);
  REQUIRE_MESSAGE(ended, submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());

  for (auto [who, port] : {std::pair{"coordinator", coordinator_port}, {"node", node_port}}) {
    INFO(who);
    const auto healthz = http_get(port, "/healthz");
    CHECK_MESSAGE(healthz.rfind("HTTP/1.1 200", 0) == 0, healthz);
    const auto response = http_get(port, "/metrics");
    REQUIRE_MESSAGE(response.rfind("HTTP/1.1 200", 0) == 0, response);
    auto samples = samples_of(response);
    INFO(response);
    CHECK(samples["solstice_jobs_total{status=\"succeeded\"}"] == 1);
    CHECK(samples["solstice_jobs_running"] == 0);
    CHECK(samples["solstice_vms_running"] == 0);
    CHECK(samples["solstice_vm_slots_free"] == 1);
    CHECK(samples["solstice_job_duration_seconds_count"] == 1);
  }

  // The node's log: JSON lines; the job's start and end, each with its id.
  std::istringstream lines(node.err());
  std::string line, started_id, finished_id;
  while (std::getline(lines, line)) {
    auto object = nlohmann::json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(object.is_object(), "not a JSON log line: " << line);
    const auto message = object.value("message", "");
    if (message.find("started on node metrics-node") != std::string::npos)
      started_id = object.value("job_id", "");
    if (message.find("finished on node metrics-node: SUCCEEDED") != std::string::npos)
      finished_id = object.value("job_id", "");
  }
  CHECK_MESSAGE(!started_id.empty(), node.err());
  CHECK_MESSAGE(started_id == finished_id, node.err());

  node.kill(SIGTERM);
  CHECK_MESSAGE(node.wait_exit(60s), node.describe());
  coordinator.kill(SIGTERM);
  CHECK_MESSAGE(coordinator.wait_exit(20s), coordinator.describe());
}
