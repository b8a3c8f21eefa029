// What `submit --amqp` makes of the messages of its job's queue: one run of the
// job, each event once, in order; copies (published again after a lost
// connection) dropped by sequence number, an older run's messages dropped.
#include <doctest/doctest.h>

#include "runtime/amqp/job_follower.hpp"
#include "runtime/job/event_log.hpp"

using namespace solstice;

namespace {

// A message of the events `first` .. `last` (JSON Lines, as nodes sent them before
// protobuf batches and with --amqp-events-format json; test_event_batch.cpp has those).
amqp::Delivery batch_message(const std::string& run, uint64_t first, uint64_t last,
                             bool redelivered = false) {
  amqp::Delivery delivery;
  delivery.exchange = amqp::Names{}.events_exchange;
  for (auto sequence = first; sequence <= last; ++sequence) {
    v1::JobEvent event;
    event.set_v(1);
    event.set_job_id("j");
    event.set_sequence(sequence);
    event.mutable_output()->set_data("chunk " + std::to_string(sequence));
    delivery.body += (sequence == first ? "" : "\n") + event_to_json_line(event);
  }
  delivery.headers = {{"x-solstice-dispatch", run}, {"x-solstice-node", run.substr(0, 1)}};
  if (redelivered)
    delivery.headers["x-solstice-redelivered"] = "true";
  return delivery;
}

amqp::Delivery event_message(const std::string& run, uint64_t sequence, bool redelivered = false) {
  return batch_message(run, sequence, sequence, redelivered);
}

amqp::Delivery result_message(const std::string& run, int exit_code) {
  amqp::Delivery delivery;
  delivery.exchange = amqp::Names{}.results_exchange;
  delivery.body = "{\"jobId\": \"j\", \"status\": \"FAILED\", \"exitCode\": " +
                  std::to_string(exit_code) + "}";
  delivery.headers = {{"x-solstice-dispatch", run}};
  return delivery;
}

std::optional<uint64_t> shown(amqp::JobFollower& follower, const amqp::Delivery& delivery) {
  auto verdict = follower.accept(delivery);
  if (verdict.events.empty())
    return std::nullopt;
  REQUIRE(verdict.events.size() == 1);
  return verdict.events[0].sequence();
}

std::vector<uint64_t> sequences(const amqp::JobFollower::Verdict& verdict) {
  std::vector<uint64_t> out;
  for (const auto& event : verdict.events)
    out.push_back(event.sequence());
  return out;
}

}  // namespace

TEST_CASE("job follower: copies published again are dropped; a gap is counted") {
  amqp::JobFollower follower{amqp::Names{}};
  CHECK(shown(follower, event_message("a/1", 0)) == 0);
  CHECK(shown(follower, event_message("a/1", 1)) == 1);
  CHECK(shown(follower, event_message("a/1", 2)) == 2);
  // The node lost its connection before 1 and 2 were confirmed: it sends them again.
  CHECK_FALSE(shown(follower, event_message("a/1", 1)));
  CHECK_FALSE(shown(follower, event_message("a/1", 2)));
  CHECK(shown(follower, event_message("a/1", 3)) == 3);
  CHECK(follower.duplicates_dropped() == 2);
  CHECK(follower.missing() == 0);
  auto verdict = follower.accept(event_message("a/1", 6));
  REQUIRE(verdict.events.size() == 1);
  CHECK(follower.missing() == 2);
  CHECK(verdict.note.find("2 event(s)") != std::string::npos);
  auto result = follower.accept(result_message("a/1", 3));
  REQUIRE(result.events.size() == 1);
  REQUIRE(result.events[0].has_result());
  CHECK(result.events[0].result().exit_code() == 3);
  CHECK(result.events[0].sequence() == 7);
}

TEST_CASE("job follower: a second run of the job replaces the first; the first's late "
          "messages and result are dropped") {
  amqp::JobFollower follower{amqp::Names{}};
  CHECK(shown(follower, event_message("a/1", 0)) == 0);
  CHECK(shown(follower, event_message("a/1", 1)) == 1);
  auto switched = follower.accept(event_message("b/2", 0, true));
  REQUIRE(switched.events.size() == 1);
  CHECK(switched.note.find("delivered again") != std::string::npos);
  CHECK(switched.note.find("node b") != std::string::npos);
  // The first node got its connection back and publishes the rest of its run.
  CHECK_FALSE(shown(follower, event_message("a/1", 2)));
  CHECK(follower.accept(result_message("a/1", 0)).events.empty());
  CHECK(follower.older_run_dropped() == 2);
  CHECK(shown(follower, event_message("b/2", 1)) == 1);
  auto result = follower.accept(result_message("b/2", 4));
  REQUIRE(result.events.size() == 1);
  CHECK(result.events[0].result().exit_code() == 4);
}

TEST_CASE("job follower: a run that is a redelivery from its first message says so") {
  amqp::JobFollower follower{amqp::Names{}};
  auto first = follower.accept(event_message("b/2", 0, true));
  REQUIRE(first.events.size() == 1);
  CHECK(first.note.find("delivered again") != std::string::npos);
  CHECK(follower.accept(event_message("b/2", 1, true)).note.empty());
}

TEST_CASE("job follower: a message of several events shows each once, in order; a batch "
          "published again after a lost connection shows only what is new") {
  amqp::JobFollower follower{amqp::Names{}};
  auto first = follower.accept(batch_message("a/1", 0, 3));
  CHECK(sequences(first) == std::vector<uint64_t>{0, 1, 2, 3});
  CHECK(first.note.empty());
  // The node batches differently after reconnecting: 2..6 overlaps what was shown.
  auto again = follower.accept(batch_message("a/1", 2, 6));
  CHECK(sequences(again) == std::vector<uint64_t>{4, 5, 6});
  CHECK(follower.duplicates_dropped() == 2);
  // A batch after a gap: the gap is told, the events are shown.
  auto gap = follower.accept(batch_message("a/1", 9, 10));
  CHECK(sequences(gap) == std::vector<uint64_t>{9, 10});
  CHECK(gap.note.find("2 event(s)") != std::string::npos);
  CHECK(follower.missing() == 2);
  // A line that is not an event is told, the rest of the message still shown.
  auto broken = batch_message("a/1", 11, 12);
  broken.body.insert(broken.body.find('\n') + 1, "{not json\n");
  auto mixed = follower.accept(broken);
  CHECK(sequences(mixed) == std::vector<uint64_t>{11, 12});
  CHECK_MESSAGE(mixed.note.find("JSON Lines event batch, line 2: not a job event") !=
                  std::string::npos,
                mixed.note);
}
