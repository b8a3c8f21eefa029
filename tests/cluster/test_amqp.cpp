// Runner nodes on RabbitMQ end to end: a real broker (tests/cluster/rabbitmq_broker,
// one shared by these cases), `solstice-runner node --amqp` and `submit --amqp` as
// real processes, real QEMU and the built test guest on TCG. A lost broker, flow
// control and amqps:// are in test_amqp_resilience.cpp.
#include <doctest/doctest.h>

#include <signal.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <google/protobuf/util/json_util.h>

#include "runtime/amqp/amqp_client.hpp"
#include "runtime/amqp/event_batch.hpp"
#include "runtime/job/event_log.hpp"
#include "solstice.pb.h"
#include "tests/cluster/amqp_bus.hpp"

using namespace solstice;
using namespace solstice::cluster_testing;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

TEST_CASE("AMQP: two nodes with two slots share eight jobs; each runs once; exit codes pass "
          "through submit --amqp") {
  Bus bus;
  bus.start_node("a", 2);
  bus.start_node("b", 2);
  std::vector<RunnerProcess> submits;
  for (int i = 0; i < 8; ++i) {
    auto id = "share-" + std::to_string(i);
    submits.push_back(bus.submit(
      bus.job_file(id, job_json(id, "echo ran-" + id + "; exit " + std::to_string(i % 3)))));
  }
  for (int i = 0; i < 8; ++i) {
    auto& submit = submits[i];
    auto id = "share-" + std::to_string(i);
    REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
    CHECK_MESSAGE(submit.exit_code() == i % 3, submit.describe());
    auto events = printed_events(submit.out());
    CHECK_MESSAGE(stdout_of_steps(events).find("ran-" + id) != std::string::npos,
                  submit.describe());
    auto answers = results(events);
    REQUIRE_MESSAGE(answers.size() == 1, submit.describe());
    CHECK(answers[0].job_id() == id);
    CHECK_FALSE(answers[0].redelivered());
  }
  // Every job was taken exactly once, and both nodes took some.
  auto a_out = bus.node("a").out(), b_out = bus.node("b").out();
  for (int i = 0; i < 8; ++i) {
    auto taken = "job share-" + std::to_string(i) + " taken";
    CHECK_MESSAGE(count_of(a_out + b_out, taken) == 1, a_out << "\n---\n" << b_out);
  }
  CHECK_MESSAGE(count_of(a_out, " taken") > 0, a_out);
  CHECK_MESSAGE(count_of(b_out, " taken") > 0, b_out);
  // Every result was also kept in the durable results queue, and nothing waits.
  auto client = bus.client();
  auto results_depth = client->queue_counts("solstice.results");
  REQUIRE(results_depth);
  CHECK(results_depth->first == 8);
  auto jobs_depth = client->queue_counts("solstice.jobs");
  REQUIRE(jobs_depth);
  CHECK(jobs_depth->first == 0);
  bus.stop_nodes();
}

TEST_CASE("AMQP: a poison message goes to the dead-letter queue with its reason; the node "
          "keeps going") {
  Bus bus;
  auto& node = bus.start_node("solo", 1);
  auto client = bus.client();
  amqp::Message poison{"solstice.jobs", "solstice.jobs", "{this is not json", {}, "poison-1", true};
  REQUIRE(client->publish_confirmed(poison, 30s));
  amqp::Message unknown_label{"solstice.jobs", "solstice.jobs",
                              "{\"id\": \"poison-2\", \"runs_on\": \"no-such-label\", "
                              "\"steps\": [{\"script\": \"true\"}]}",
                              {}, "poison-2", true};
  REQUIRE(client->publish_confirmed(unknown_label, 30s));

  // Both land in the dead-letter queue, each with why.
  REQUIRE(client->consume("solstice.jobs.dead", 0, true));
  std::map<std::string, std::string> reasons;  // by correlation id
  auto deadline = Clock::now() + 60s;
  while (reasons.size() < 2 && Clock::now() < deadline) {
    auto frame = client->next(200ms);
    REQUIRE_MESSAGE(frame, frame.error().message);
    if (auto* delivery = std::get_if<amqp::Delivery>(&*frame))
      reasons[delivery->correlation_id] = delivery->headers["x-solstice-reason"];
  }
  REQUIRE_MESSAGE(reasons.size() == 2, node.describe());
  CHECK_MESSAGE(reasons["poison-1"].find("message") != std::string::npos, reasons["poison-1"]);
  CHECK_MESSAGE(reasons["poison-2"].find("no-such-label") != std::string::npos,
                reasons["poison-2"]);
  auto jobs_depth = client->queue_counts("solstice.jobs");
  REQUIRE(jobs_depth);
  CHECK(jobs_depth->first == 0);

  // The node is still there and runs the next job.
  auto submit = bus.submit(bus.job_file("after", job_json("after-poison", "echo still-here")));
  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  CHECK(stdout_of_steps(printed_events(submit.out())).find("still-here") != std::string::npos);
  CHECK_FALSE(node.status());

  // status --amqp: nothing waits, one node consumes.
  std::vector<std::string> status_args{"status"};
  auto amqp = bus.amqp_args();
  status_args.insert(status_args.end(), amqp.begin(), amqp.end());
  RunnerProcess status{status_args};
  REQUIRE_MESSAGE(status.wait_exit(60s), status.describe());
  CHECK_MESSAGE(status.exit_code() == 0, status.describe());
  CHECK_MESSAGE(status.out().find("queue solstice.jobs: 0 job(s) waiting, 1 node(s) consuming") !=
                  std::string::npos,
                status.describe());
  bus.stop_nodes();
}

TEST_CASE("AMQP: kill -9 of a node mid-step: its job is delivered again and finishes on the "
          "other node, marked redelivered; the dead node's QEMU is gone") {
  Bus bus;
  bus.start_node("first", 1);
  bus.start_node("second", 1);
  auto submit = bus.submit(bus.job_file(
    "long", job_json("redelivered-job", "echo step-begins; sleep 25; echo step-ends; exit 4")));
  REQUIRE_MESSAGE(wait_for_step_output(submit, "step-begins", job_limit), submit.describe());
  // Whichever node took it first is killed.
  std::string doomed = bus.node("first").out().find("job redelivered-job taken") !=
                           std::string::npos
                         ? "first"
                         : "second";
  std::string other = doomed == "first" ? "second" : "first";
  REQUIRE_MESSAGE(bus.node(doomed).out().find("job redelivered-job taken") != std::string::npos,
                  bus.node(doomed).describe());
  bus.node(doomed).kill(SIGKILL);
  REQUIRE(bus.node(doomed).wait_exit(10s));
  // Its QEMU died with it.
  auto gone_by = Clock::now() + 15s;
  while (qemu_mentions(bus.state_dir(doomed).string()) && Clock::now() < gone_by)
    std::this_thread::sleep_for(200ms);
  CHECK_FALSE(qemu_mentions(bus.state_dir(doomed).string()));

  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe());
  CHECK_MESSAGE(submit.exit_code() == 4, submit.describe());
  CHECK(bus.node(other).out().find("job redelivered-job taken (redelivered)") !=
        std::string::npos);
  auto events = printed_events(submit.out());
  auto answers = results(events);
  REQUIRE_MESSAGE(answers.size() == 1, submit.describe());
  CHECK(answers[0].redelivered());
  CHECK(stdout_of_steps(events).find("step-ends") != std::string::npos);
  CHECK(submit.err().find("delivered again") != std::string::npos);
  bus.forget_node(doomed);
  bus.stop_nodes();
}

TEST_CASE("AMQP: a jobrequest.v1 from the bus runs and is answered as jobresult.v1") {
  Bus bus;
  bus.start_node("ci", 1);
  auto client = bus.client();
  const std::string request_id = "5b1c0f9e-2a47-4c1e-9d35-7e0b8c6a1f20";
  auto queue = client->declare_private_queue(
    {{"solstice.results", amqp::job_routing_key(request_id)}});
  REQUIRE_MESSAGE(queue, queue.error().message);
  amqp::Message request{"solstice.jobs", "solstice.jobs",
                        "{\"schema_version\": \"jobrequest.v1\", \"request_id\": \"" + request_id +
                          "\", \"source\": \"test\", \"repo_owner\": \"octo\", \"repo_name\": "
                          "\"demo\", \"commit_sha\": \"0123456789abcdef\", \"runs_on\": "
                          "\"solstice-test-guest\", \"script_path\": \"/bin/false\"}",
                        {}, request_id, true};
  REQUIRE(client->publish_confirmed(request, 30s));
  REQUIRE(client->consume(*queue, 0, true));
  std::optional<amqp::Delivery> answer;
  auto deadline = Clock::now() + job_limit;
  while (!answer && Clock::now() < deadline) {
    auto frame = client->next(500ms);
    REQUIRE_MESSAGE(frame, frame.error().message);
    if (auto* delivery = std::get_if<amqp::Delivery>(&*frame))
      answer = *delivery;
  }
  REQUIRE_MESSAGE(answer, bus.node("ci").describe());
  CHECK(answer->correlation_id == request_id);
  CHECK(answer->headers["x-solstice-schema"] == "jobresult.v1");
  auto body = answer->body;
  CHECK_MESSAGE(body.find("\"schema_version\":\"jobresult.v1\"") != std::string::npos, body);
  CHECK_MESSAGE(body.find("\"request_id\":\"" + request_id + "\"") != std::string::npos, body);
  CHECK_MESSAGE(body.find("\"success\":false") != std::string::npos, body);
  CHECK_MESSAGE(body.find("\"exit_code\":1") != std::string::npos, body);
  CHECK_MESSAGE(body.find("\"repo_name\":\"demo\"") != std::string::npos, body);
  CHECK_MESSAGE(body.find("\"completed_at\":\"20") != std::string::npos, body);
  bus.stop_nodes();
}

TEST_CASE("AMQP: a job the node refuses for what it asks ends INVALID_INPUT for its submitter "
          "(exit code 2, the reason shown), not a wait for a result that never comes") {
  Bus bus;
  auto& node = bus.start_node("strict", 1);
  // A label no node has: submit --amqp follows the job, and learns why.
  auto submit = bus.submit(bus.job_file(
    "refused-label", "{\"id\": \"refused-label\", \"runs_on\": \"no-such-label\", \"steps\": "
                     "[{\"script\": \"true\"}]}"));
  REQUIRE_MESSAGE(submit.wait_exit(120s), submit.describe() << "\n" << node.describe());
  CHECK_MESSAGE(submit.exit_code() == 2, submit.describe());
  auto answers = results(printed_events(submit.out()));
  REQUIRE_MESSAGE(answers.size() == 1, submit.describe());
  CHECK(answers[0].status() == v1::INVALID_INPUT);
  CHECK_MESSAGE(answers[0].error().find("no-such-label") != std::string::npos, answers[0].error());
  CHECK_MESSAGE(answers[0].error().find("node strict refused the job") != std::string::npos,
                answers[0].error());

  // A message straight on the bus (not from submit, which uploads its own files)
  // that names a file of the node's: refused the same way, its result on the bus.
  auto client = bus.client();
  auto queue = client->declare_private_queue(
    {{"solstice.results", amqp::job_routing_key("refused-upload")}});
  REQUIRE_MESSAGE(queue, queue.error().message);
  amqp::Message hostile{"solstice.jobs", "solstice.jobs",
                        "{\"id\": \"refused-upload\", \"runs_on\": \"solstice-test-guest\", "
                        "\"uploads\": [{\"source\": \"/etc/hostname\", \"destination\": "
                        "\"/tmp/stolen\"}], \"steps\": [{\"script\": \"cat /tmp/stolen\"}]}",
                        {}, "refused-upload", true};
  REQUIRE(client->publish_confirmed(hostile, 30s));
  REQUIRE(client->consume(*queue, 0, true));
  std::optional<amqp::Delivery> answer;
  for (auto deadline = Clock::now() + 120s; !answer && Clock::now() < deadline;) {
    auto frame = client->next(500ms);
    REQUIRE_MESSAGE(frame, frame.error().message);
    if (auto* delivery = std::get_if<amqp::Delivery>(&*frame))
      answer = *delivery;
  }
  REQUIRE_MESSAGE(answer, node.describe());
  CHECK(answer->correlation_id == "refused-upload");
  CHECK(answer->headers["x-solstice-schema"] == "JobResult");
  v1::JobResult result;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  REQUIRE(google::protobuf::util::JsonStringToMessage(answer->body, &result, options).ok());
  CHECK(result.status() == v1::INVALID_INPUT);
  CHECK(result.exit_code() == 2);
  CHECK_MESSAGE(result.error().find("names a file on the node") != std::string::npos,
                result.error());

  // Neither ran; both are in the dead-letter queue, nothing waits in the jobs queue.
  for (const auto& id : {"refused-label", "refused-upload"})
    CHECK_MESSAGE(node.out().find(std::string{"job "} + id + " taken") == std::string::npos,
                  node.describe());
  auto dead = client->queue_counts("solstice.jobs.dead");
  REQUIRE(dead);
  CHECK(dead->first >= 2);
  auto waiting = client->queue_counts("solstice.jobs");
  REQUIRE(waiting);
  CHECK(waiting->first == 0);
  CHECK_FALSE(node.status());
  bus.stop_nodes();
}

TEST_CASE("AMQP: a step's output bytes, every byte value and invalid UTF-8 among them, reach "
          "submit's stdout exactly; events travel as length-delimited protobuf (JSON Lines "
          "with --amqp-events-format json)") {
  std::string format = "protobuf", content_type = "application/x-protobuf";
  SUBCASE("protobuf (the default)") {}
  SUBCASE("json") {
    format = "json";
    content_type = "application/x-ndjson";
  }
  // 256 bytes 0x00..0xff doubled twelve times: 1 MiB, several messages of events.
  std::string escapes, pattern;
  for (int i = 0; i < 256; ++i) {
    char octal[8];
    std::snprintf(octal, sizeof octal, "\\%03o", i);
    escapes += octal;
    pattern += static_cast<char>(i);
  }
  std::string expected;
  for (int i = 0; i < 4096; ++i)
    expected += pattern;
  const std::string script = "printf '" + escapes + "' > /tmp/p; for i in 1 2 3 4 5 6 7 8 9 10 "
                             "11 12; do cat /tmp/p /tmp/p > /tmp/q; mv /tmp/q /tmp/p; done; "
                             "cat /tmp/p";
  const auto id = "bytes-" + format;

  Bus bus;
  auto connection = bus.amqp_args();
  connection.insert(connection.end(), {"--amqp-events-format", format});
  auto& node = bus.start_node("bytes", 1, connection);
  // A second reader of the job's events, to see them as they are on the bus.
  auto tap = bus.client();
  auto queue = tap->declare_private_queue({{"solstice.events", amqp::job_routing_key(id)}});
  REQUIRE_MESSAGE(queue, queue.error().message);
  REQUIRE(tap->consume(*queue, 0, true));

  auto submit = bus.submit(bus.job_file(id, job_json(id, script)), false);
  REQUIRE_MESSAGE(submit.wait_exit(job_limit), submit.describe() << "\n" << node.describe());
  CHECK_MESSAGE(submit.exit_code() == 0, submit.describe());
  // Human output: the step's bytes as they are, once, between its start and end lines.
  const auto& out = submit.out();
  const auto at = out.find(expected);
  CHECK_MESSAGE(at != std::string::npos, "submit's stdout (" << out.size() << " bytes) does not "
                                                                "hold the guest's 1 MiB as it is");
  CHECK(out.find(expected, at + 1) == std::string::npos);

  std::string on_bus;
  size_t messages = 0;
  for (auto quiet_until = Clock::now() + 5s; Clock::now() < quiet_until;) {
    auto frame = tap->next(500ms);
    REQUIRE_MESSAGE(frame, frame.error().message);
    auto* delivery = std::get_if<amqp::Delivery>(&*frame);
    if (!delivery)
      continue;
    ++messages;
    CHECK(delivery->content_type == content_type);
    CHECK(delivery->headers["x-solstice-schema"] == "JobEvent");
    auto batch = amqp::decode_event_batch(delivery->body, delivery->content_type);
    CHECK_MESSAGE(batch.error.empty(), batch.error);
    for (const auto& event : batch.events)
      if (event.has_output() && event.output().stream() == v1::STDOUT)
        on_bus += event.output().data();
    quiet_until = Clock::now() + 2s;
  }
  CHECK(messages > 1);
  CHECK(on_bus == expected);
  bus.stop_nodes();
}
