// Runner nodes on RabbitMQ when the broker is away, slow or behind TLS: a broker
// restart in the middle of a streaming job (the job keeps running, nothing is
// lost or shown twice, the submitter reconnects), a broker that blocks
// publishing while nobody reads (the node's memory stays bounded: the guest's
// output is held), and amqps:// with client certificates. Real rabbitmq-server,
// real processes, real QEMU and the test guest on TCG.
#include <doctest/doctest.h>

#include <signal.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/cluster/amqp_bus.hpp"

using namespace solstice;
using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {

// Every event printed once, in order: sequence numbers 0, 1, 2, ... and each
// output stream's own 0, 1, 2, ...
void check_no_gap_or_copy(const std::vector<v1::JobEvent>& events) {
  uint64_t next = 0;
  std::map<int, uint64_t> next_chunk;
  for (const auto& event : events) {
    REQUIRE_MESSAGE(event.sequence() == next, "event " << next << " expected, got "
                                                        << event.sequence());
    ++next;
    if (event.has_output()) {
      auto& chunk = next_chunk[event.output().stream()];
      REQUIRE_MESSAGE(event.output().sequence() == chunk,
                      "output chunk " << chunk << " expected, got " << event.output().sequence());
      ++chunk;
    }
  }
}

// VmRSS of a process in KiB (0 once it is gone).
uint64_t rss_kib(pid_t pid) {
  std::ifstream status{"/proc/" + std::to_string(pid) + "/status"};
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmRSS:", 0) == 0)
      return std::stoull(line.substr(6));
  return 0;
}

// The node's line "job ID answered: ..." (amqp_node_jobs.cpp), or "".
std::string flow_report(const std::string& out, const std::string& job_id) {
  const auto start = out.find("job " + job_id + " answered:");
  return start == std::string::npos ? std::string{}
                                    : out.substr(start, out.find('\n', start) - start);
}

// The number between `before` and `after` in `text` (-1: not there).
long count_in(const std::string& text, const std::string& before, const std::string& after) {
  for (auto at = text.find(before); at != std::string::npos; at = text.find(before, at + 1)) {
    const auto digits = at + before.size();
    auto end = digits;
    while (end < text.size() && std::isdigit(static_cast<unsigned char>(text[end])))
      ++end;
    if (end > digits && text.compare(end, after.size(), after) == 0)
      return std::stol(text.substr(digits, end - digits));
  }
  return -1;
}

}  // namespace

TEST_CASE("AMQP: the broker stops and starts while a job streams output: the job keeps "
          "running, submit --amqp reconnects, every line arrives once, and the node runs the "
          "next job") {
  Bus bus{true};
  auto& node = bus.start_node("steady", 1);
  const int lines = 300;
  auto submit = bus.submit(bus.job_file(
    "stream", job_json("stream-restart", "for i in $(seq 1 " + std::to_string(lines) +
                                           "); do echo line-$i; sleep 0.1; done")));
  REQUIRE_MESSAGE(wait_for_step_output(submit, "line-3\n", job_limit), submit.describe());

  bus.broker().stop();
  REQUIRE_MESSAGE(node.wait_for_output("1 job(s) keep running", 30s), node.describe());
  REQUIRE_MESSAGE(submit.wait_for_output("lost the AMQP broker", 30s), submit.describe());
  std::this_thread::sleep_for(3s);  // the guest goes on printing meanwhile
  CHECK_FALSE(node.status());
  bus.broker().start();

  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe() << "\n" << node.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  CHECK(submit.err().find("reconnected") != std::string::npos);
  auto events = printed_events(submit.out());
  check_no_gap_or_copy(events);
  std::string expected;
  for (int i = 1; i <= lines; ++i)
    expected += "line-" + std::to_string(i) + "\n";
  CHECK(stdout_of_steps(events) == expected);
  auto answers = results(events);
  REQUIRE(answers.size() == 1);
  CHECK_FALSE(answers[0].redelivered());
  // It ran once: the broker kept the job's delivery, given back with the lost
  // connection, until the node's one slot was free again (the node consumed
  // nothing meanwhile), and the node acknowledged it as answered.
  CHECK_MESSAGE(count_of(node.out(), "job stream-restart taken") == 1, node.describe());
  auto client = bus.client();
  std::pair<uint32_t, uint32_t> depth{1, 0};
  for (int i = 0; i < 150 && depth.first != 0; ++i) {
    std::this_thread::sleep_for(200ms);
    auto counts = client->queue_counts("solstice.jobs");
    REQUIRE(counts);
    depth = *counts;
  }
  CHECK(depth.first == 0);
  CHECK_MESSAGE(node.out().find("job stream-restart delivered again") != std::string::npos,
                node.describe());

  auto next = bus.submit(bus.job_file("again", job_json("after-restart", "echo reconnected")));
  REQUIRE_MESSAGE(next.wait_exit(job_limit), next.describe());
  CHECK_MESSAGE(next.exit_code() == 0, next.describe());
  CHECK(stdout_of_steps(printed_events(next.out())).find("reconnected") != std::string::npos);
  bus.stop_nodes();
}

TEST_CASE("AMQP: a node that reconnects while every slot still runs a job of the lost "
          "connection consumes nothing until one ends: the queue's jobs wait in the queue, "
          "for any node, not in this one") {
  Bus bus{true};
  auto& node = bus.start_node("full", 1);
  auto first = bus.submit(bus.job_file(
    "long", job_json("long-across-restart", "echo started; sleep 60; echo finished")));
  REQUIRE_MESSAGE(wait_for_step_output(first, "started\n", job_limit), first.describe());
  bus.broker().stop();
  REQUIRE_MESSAGE(node.wait_for_output("1 job(s) keep running", 30s), node.describe());
  bus.broker().start();
  REQUIRE_MESSAGE(node.wait_for_output("taking jobs from the queue again once one of them ends", 60s),
                  node.describe());
  auto second = bus.submit(bus.job_file("next", job_json("queued-while-full", "echo next")));

  // The first job's delivery (given back with the lost connection) and the new
  // one both wait in the queue, ready for any node: this one does not consume.
  auto client = bus.client();
  std::pair<uint32_t, uint32_t> depth{0, 0};
  for (int i = 0; i < 100 && depth.first < 2; ++i) {
    std::this_thread::sleep_for(200ms);
    auto counts = client->queue_counts("solstice.jobs");
    REQUIRE(counts);
    depth = *counts;
  }
  CHECK_MESSAGE(depth.first == 2, "ready " << depth.first << ", consumers " << depth.second);
  std::this_thread::sleep_for(2s);
  auto later = client->queue_counts("solstice.jobs");
  REQUIRE(later);
  CHECK(later->first == 2);
  CHECK(later->second == 0);
  CHECK_FALSE(first.status());  // still running on the node

  // Once the first job ends the node consumes again: its own job's delivery is
  // acknowledged once its result is confirmed, the next one runs.
  REQUIRE_MESSAGE(first.wait_exit(job_limit), first.describe() << "\n" << node.describe());
  CHECK_MESSAGE(first.exit_code() == 0, first.describe());
  CHECK(stdout_of_steps(printed_events(first.out())) == "started\nfinished\n");
  REQUIRE_MESSAGE(second.wait_exit(job_limit), second.describe() << "\n" << node.describe());
  CHECK_MESSAGE(second.exit_code() == 0, second.describe());
  CHECK(stdout_of_steps(printed_events(second.out())) == "next\n");
  CHECK_MESSAGE(count_of(node.out(), "job long-across-restart taken") == 1, node.describe());
  CHECK_MESSAGE(node.out().find("job long-across-restart delivered again: still running") ==
                  std::string::npos,
                node.describe());
  CHECK_MESSAGE(node.out().find("job long-across-restart delivered again: ") != std::string::npos,
                node.describe());
  auto drained = client->queue_counts("solstice.jobs");
  REQUIRE(drained);
  CHECK(drained->first == 0);
  bus.stop_nodes();
}

TEST_CASE("AMQP: a broker that blocks publishing while the submitter reads nothing: the "
          "node's memory stays bounded during a flood; everything arrives once it goes on") {
  Bus bus;
  auto& node = bus.start_node("flood", 1);
  // The flood starts once the broker has been told to push back.
  const uint64_t flood_bytes = 32ull << 20;
  auto submit = bus.submit(bus.job_file(
    "flood", job_json("flood-held", "echo flood-ready; sleep 25; yes | head -c " +
                                      std::to_string(flood_bytes) +
                                      "; echo; echo flood-done")));
  REQUIRE_MESSAGE(wait_for_step_output(submit, "flood-ready", job_limit), submit.describe());
  const auto baseline_kib = rss_kib(node.pid());
  REQUIRE(baseline_kib > 0);
  // A disk alarm: the broker blocks every connection that publishes.
  struct Unblock {
    RabbitBroker& broker;
    ~Unblock() { broker.ctl({"set_disk_free_limit", "1MB"}); }
  } unblock{bus.broker()};
  bus.broker().ctl({"set_disk_free_limit", "100000GB"});
  ::kill(submit.pid(), SIGSTOP);  // and the submitter reads nothing
  REQUIRE_MESSAGE(node.wait_for_output("the broker blocks this node's publishing", 120s),
                  node.describe());
  // The guest floods on; the node may hold only its bound (4 MiB) of it.
  uint64_t peak_kib = baseline_kib;
  for (auto until = Clock::now() + 25s; Clock::now() < until;) {
    peak_kib = std::max(peak_kib, rss_kib(node.pid()));
    std::this_thread::sleep_for(100ms);
  }
  const uint64_t bound_kib = 16 << 10;  // half the flood
  MESSAGE("node RSS " << baseline_kib << " KiB before the flood, peak " << peak_kib
                      << " KiB while blocked");
  CHECK_MESSAGE(peak_kib - baseline_kib < bound_kib,
                "node RSS grew by " << (peak_kib - baseline_kib) << " KiB while blocked");
  CHECK_FALSE(node.status());

  bus.broker().ctl({"set_disk_free_limit", "1MB"});
  ::kill(submit.pid(), SIGCONT);
  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe() << "\n" << node.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  auto events = printed_events(submit.out());
  check_no_gap_or_copy(events);
  auto text = stdout_of_steps(events);
  CHECK(count_of(text, "y\n") == flood_bytes / 2 + 1);  // + the one of "flood-ready\n"
  CHECK(text.find("flood-done") != std::string::npos);
  CHECK(node.err().find("the broker takes this node's publishing again") != std::string::npos);
  // The node says that the broker held the job's events and that the guest's
  // output was held back meanwhile (its line once the result is confirmed).
  REQUIRE_MESSAGE(node.wait_for_output("job flood-held answered:", 60s), node.describe());
  const auto report = flow_report(node.out(), "flood-held");
  MESSAGE(report);
  CHECK_MESSAGE(count_in(report, "broker blocked ", " times") > 0, report);
  CHECK_MESSAGE(count_in(report, "output held back ", " times") > 0, report);
  CHECK_MESSAGE(count_in(report, "at most ", " KiB output held") >= 4 << 10, report);
  CHECK_MESSAGE(count_in(report, "at most ", " KiB output held") < 16 << 10, report);
  bus.stop_nodes();
}

TEST_CASE("AMQP: a submitter whose own stdout is not read while a step floods output holds "
          "only a bounded part of it; the broker keeps the rest, and everything arrives") {
  Bus bus;
  bus.start_node("reader", 1);
  const uint64_t flood_bytes = 32ull << 20;
  const std::string job_id = "flood-unread";
  auto submit = bus.submit(bus.job_file(
    "flood", job_json(job_id, "echo flood-ready; sleep 3; yes | head -c " +
                                std::to_string(flood_bytes) + "; echo; echo flood-done")));
  REQUIRE_MESSAGE(wait_for_step_output(submit, "flood-ready", job_limit), submit.describe());
  const auto baseline_kib = rss_kib(submit.pid());
  REQUIRE(baseline_kib > 0);
  // From here the test reads nothing of the submitter's stdout (a pipe of 64 KiB):
  // its printer blocks in write() while the flood goes on.
  auto client = bus.client();
  uint64_t peak_kib = baseline_kib;
  uint32_t peak_queued = 0;
  for (auto until = Clock::now() + 40s; Clock::now() < until;) {
    peak_kib = std::max(peak_kib, rss_kib(submit.pid()));
    if (auto depth = client->queue_counts("solstice.follow." + job_id))
      peak_queued = std::max(peak_queued, depth->first);
    std::this_thread::sleep_for(100ms);
  }
  const uint64_t bound_kib = 16 << 10;  // half the flood (its JSON is a third larger still)
  MESSAGE("submitter RSS " << baseline_kib << " KiB before the flood, peak " << peak_kib
                           << " KiB while its stdout was not read; up to " << peak_queued
                           << " message(s) waited in its queue");
  CHECK_MESSAGE(peak_kib - baseline_kib < bound_kib,
                "submitter RSS grew by " << (peak_kib - baseline_kib) << " KiB");
  // The broker held what the submitter did not take.
  CHECK(peak_queued > 0);

  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  auto events = printed_events(submit.out());
  check_no_gap_or_copy(events);
  auto text = stdout_of_steps(events);
  CHECK(count_of(text, "y\n") == flood_bytes / 2 + 1);  // + the one of "flood-ready\n"
  CHECK(text.find("flood-done") != std::string::npos);
  // The node sent the flood in batches of events, not a message per output chunk:
  // at most one message per 100 ms (batch_hold) while it lasted, or per 512 KiB
  // (max_batch_bytes) where the guest was faster. (How many events a
  // batch holds depends on the guest's pace, which a loaded machine slows down.)
  const auto chunks = std::count_if(events.begin(), events.end(),
                                    [](const v1::JobEvent& e) { return e.has_output(); });
  int64_t first_us = 0, last_us = 0;
  for (const auto& event : events)
    if (event.has_output()) {
      first_us = first_us ? first_us : event.timestamp_us();
      last_us = event.timestamp_us();
    }
  const double flood_s = static_cast<double>(last_us - first_us) / 1e6;
  MESSAGE(chunks << " output events in " << flood_s << " s; at most " << peak_queued
                 << " messages waited at once");
  CHECK(peak_queued < static_cast<uint32_t>(chunks));
  CHECK(peak_queued <= 10 * flood_s * 1.2 + flood_bytes / (512 << 10) + 10);
  bus.stop_nodes();
}

TEST_CASE("AMQP: amqps:// with client certificates: a node and a submitter run a job over "
          "TLS; a client without a certificate is refused") {
  Bus bus;
  const auto tls = shared_tls_dir();
  auto tls_args = [&](bool with_cert) {
    std::vector<std::string> args{"--amqp", bus.broker().amqps_url(), "--amqp-password-file",
                                  bus.broker().password_file().string(), "--amqp-ca",
                                  (tls / "ca.pem").string()};
    if (with_cert) {
      for (const auto& arg : {std::string{"--amqp-cert"}, (tls / "client.pem").string(),
                              std::string{"--amqp-key"}, (tls / "client.key").string()})
        args.push_back(arg);
    }
    return args;
  };
  bus.start_node("tls", 1, tls_args(true));
  auto submit = bus.submit(bus.job_file("tls", job_json("over-tls", "echo over-tls; exit 3")),
                           true, tls_args(true));
  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 3, submit.describe());
  CHECK(stdout_of_steps(printed_events(submit.out())).find("over-tls") != std::string::npos);

  std::vector<std::string> status_args{"status"};
  auto no_cert = tls_args(false);
  status_args.insert(status_args.end(), no_cert.begin(), no_cert.end());
  RunnerProcess refused{status_args};
  REQUIRE_MESSAGE(refused.wait_exit(60s), refused.describe());
  CHECK_MESSAGE(refused.exit_code() != 0, refused.describe());
  CHECK_MESSAGE(refused.err().find("localhost") != std::string::npos, refused.describe());
  bus.stop_nodes();
}
