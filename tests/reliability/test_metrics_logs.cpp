// The operator's view of a running runner: /metrics scraped during a real run
// of two jobs (one ended, one running) counts the ended job, its durations and
// output, the running job and its VM; /healthz answers 200; with --log-format
// json every diagnostic line is one JSON object and the lines about a job carry
// its id, while the jobs' own output on stdout stays as it was.
#include <doctest/doctest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <csignal>
#include <map>
#include <regex>
#include <sstream>

#include "tests/reliability/harness.hpp"

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using namespace solstice::reliability;

namespace {

constexpr auto boot_allowance = 300s;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// One HTTP/1.0 GET over a plain socket (no client library: the test checks the
// wire). The whole response, "" when the connection fails.
std::string http_get(const std::string& host, int port, const std::string& path) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return "";
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  ::inet_pton(AF_INET, host.c_str(), &address.sin_addr);
  timeval timeout{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  std::string response;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
    const std::string request = "GET " + path + " HTTP/1.0\r\nHost: " + host + "\r\n\r\n";
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

std::string body_of(const std::string& response) {
  auto end = response.find("\r\n\r\n");
  return end == std::string::npos ? "" : response.substr(end + 4);
}

// The samples of a Prometheus text exposition ("name{labels}" -> value); every
// line must be a comment (# HELP / # TYPE) or a sample, else `bad` names it.
std::map<std::string, double> parse_prometheus(const std::string& text, std::string& bad) {
  static const std::regex sample(
    R"(^([a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})?) ([-+]?[0-9.eE+-]+|\+Inf)$)");
  static const std::regex comment(R"(^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$)");
  std::map<std::string, double> samples;
  std::istringstream lines(text);
  std::string line;
  std::smatch match;
  while (std::getline(lines, line)) {
    if (std::regex_match(line, comment))
      continue;
    if (!std::regex_match(line, match, sample)) {
      bad += line + "\n";
      continue;
    }
    samples[match[1]] = std::stod(match[4]);
  }
  return samples;
}

}  // namespace

TEST_SUITE("reliability") {

TEST_CASE("metrics and logs: a scrape during a run counts the ended job and the running one; "
          "/healthz answers; JSON log lines carry the job id") {
  REQUIRE_MESSAGE(test_guest_problem().empty(), test_guest_problem());
  Sandbox sandbox;
  auto short_job = sandbox.write_json("short.json", guest_job("metrics-short", {"echo short"}));
  auto long_job = sandbox.write_json(
    "long.json", guest_job("metrics-long", {"echo long-started; sleep 600"}));
  auto args = sandbox.run_args(short_job, "tcg", {},
                               {long_job.string(), "--metrics-listen", "127.0.0.1:0",
                                "--log-format", "json", "--log-level", "debug"});
  auto runner = Runner::start(args);

  // The address is logged (port 0: any free port).
  static const std::regex logged_address(R"(metrics on http://127\.0\.0\.1:([0-9]+)/metrics)");
  std::smatch match;
  REQUIRE_MESSAGE(runner.wait_until([&] { return std::regex_search(runner.err(), match, logged_address); },
                                    60s),
                  runner.output());
  const int port = std::stoi(match[1]);

  const auto healthz = http_get("127.0.0.1", port, "/healthz");
  CHECK_MESSAGE(healthz.rfind("HTTP/1.1 200", 0) == 0, healthz);
  CHECK(body_of(healthz) == "ok\n");

  // One job ended, the other in its step.
  REQUIRE_MESSAGE(runner.wait_until(
                    [&] {
                      return sandbox.result("metrics-short") &&
                             contains(sandbox.step_output("metrics-long", 0), "long-started");
                    },
                    2 * boot_allowance),
                  runner.output());
  const auto response = http_get("127.0.0.1", port, "/metrics");
  REQUIRE_MESSAGE(response.rfind("HTTP/1.1 200", 0) == 0, response);
  CHECK(contains(response, "Content-Type: text/plain; version=0.0.4"));
  std::string bad;
  auto samples = parse_prometheus(body_of(response), bad);
  CHECK_MESSAGE(bad.empty(), "not in the text format:\n" << bad);
  INFO(body_of(response));
  CHECK(samples["solstice_jobs_total{status=\"succeeded\"}"] == 1);
  CHECK(samples["solstice_jobs_total{status=\"failed\"}"] == 0);
  CHECK(samples["solstice_jobs_running"] == 1);
  CHECK(samples["solstice_vms_running"] == 1);
  CHECK(samples["solstice_vm_slots_free"] == 1);  // max_concurrent_vms 2, one VM
  CHECK(samples["solstice_job_duration_seconds_count"] == 1);
  CHECK(samples["solstice_job_duration_seconds_bucket{le=\"+Inf\"}"] == 1);
  CHECK(samples["solstice_job_duration_seconds_sum"] > 0);
  CHECK(samples["solstice_phase_duration_seconds_count{phase=\"boot_to_ssh\"}"] == 1);
  CHECK(samples["solstice_phase_duration_seconds_count{phase=\"step\"}"] == 1);
  CHECK(samples["solstice_output_bytes_total{stream=\"stdout\"}"] >= 6);  // "short\n"
  CHECK(samples["solstice_boot_fallbacks_total"] == 0);

  runner.signal(SIGTERM);
  auto status = runner.wait(120s);
  REQUIRE_MESSAGE(status, runner.output());

  // Diagnostics: JSON lines only, the job's lines with its id.
  std::istringstream lines(runner.err());
  std::string line;
  int about_long = 0;
  while (std::getline(lines, line)) {
    if (line.empty())
      continue;  // the blank line after a signal
    auto object = nlohmann::json::parse(line, nullptr, false);
    REQUIRE_MESSAGE(object.is_object(), "not a JSON log line: " << line);
    CHECK(object.contains("time"));
    CHECK(object.contains("level"));
    CHECK(object.contains("message"));
    if (object.value("job_id", "") == "metrics-long")
      ++about_long;
  }
  CHECK_MESSAGE(about_long > 0, runner.err());
  // The jobs' output is not a log: it stays on stdout as the terminal view.
  CHECK(contains(runner.out(), "long-started"));
  check_nothing_left(sandbox);
}

}  // TEST_SUITE
