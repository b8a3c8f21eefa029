// Messages of job events on the bus (runtime/amqp/event_batch.hpp): a protobuf
// batch round-trips every byte of output, JSON Lines still read, and a broken
// message says where and why instead of crashing or inventing events.
#include <doctest/doctest.h>

#include "runtime/amqp/event_batch.hpp"
#include "runtime/amqp/job_follower.hpp"
#include "runtime/job/event_log.hpp"

using namespace solstice;

namespace {

// Every byte value, a NUL and invalid UTF-8 among them.
std::string all_bytes() {
  std::string data;
  for (int i = 0; i < 256; ++i)
    data += static_cast<char>(i);
  return data + std::string("\xff\xfe\xc3(\0tail\0", 10);
}

v1::JobEvent output_event(uint64_t sequence, const std::string& data) {
  v1::JobEvent event;
  event.set_v(event_format_version);
  event.set_job_id("j");
  event.set_sequence(sequence);
  event.set_timestamp_us(1700000000000000 + static_cast<int64_t>(sequence));
  event.mutable_output()->set_step_index(0);
  event.mutable_output()->set_sequence(sequence);
  event.mutable_output()->set_data(data);
  return event;
}

std::string protobuf_batch(const std::vector<v1::JobEvent>& events) {
  std::string body;
  for (const auto& event : events)
    amqp::append_delimited(body, event);
  return body;
}

}  // namespace

TEST_CASE("event batch: protobuf events round-trip byte for byte, large ones too") {
  std::vector<v1::JobEvent> events{output_event(0, all_bytes()), output_event(1, ""),
                                   output_event(2, std::string(300 * 1024, '\x80'))};
  v1::JobEvent state;
  state.set_job_id("j");
  state.set_sequence(3);
  state.mutable_state()->set_state(v1::RUNNING);
  events.push_back(state);
  auto decoded = amqp::decode_event_batch(protobuf_batch(events), "application/x-protobuf");
  CHECK(decoded.error.empty());
  REQUIRE(decoded.events.size() == events.size());
  for (size_t i = 0; i < events.size(); ++i)
    CHECK(decoded.events[i].SerializeAsString() == events[i].SerializeAsString());
  CHECK(decoded.events[0].output().data() == all_bytes());
  // The framing is protobuf's own delimited form: a plain varint, then the message.
  auto one = protobuf_batch({output_event(7, "x")});
  CHECK(static_cast<size_t>(static_cast<unsigned char>(one[0])) == one.size() - 1);
}

TEST_CASE("event batch: the bytes of binary output are fewer than in JSON") {
  auto event = output_event(0, std::string(64 * 1024, 'a'));
  std::string json;
  amqp::append_json_line(json, event);
  CHECK(protobuf_batch({event}).size() < 64 * 1024 + 64);
  CHECK(json.size() > 64 * 1024 * 4 / 3);
}

TEST_CASE("event batch: a broken protobuf message says which event, where and why") {
  const auto body = protobuf_batch({output_event(0, "first"), output_event(1, "second")});
  const auto first_size = protobuf_batch({output_event(0, "first")}).size();

  SUBCASE("cut off in the middle of the second event") {
    auto decoded = amqp::decode_event_batch(body.substr(0, body.size() - 3), "application/x-protobuf");
    REQUIRE(decoded.events.size() == 1);
    CHECK(decoded.events[0].output().data() == "first");
    CHECK(decoded.error.find("event 2 (at byte " + std::to_string(first_size) + ")") !=
          std::string::npos);
    CHECK(decoded.error.find("only") != std::string::npos);
  }
  SUBCASE("a length prefix that is cut off") {
    auto decoded = amqp::decode_event_batch(body.substr(0, first_size) + "\xff",
                                            "application/x-protobuf");
    CHECK(decoded.events.size() == 1);
    CHECK(decoded.error.find("length prefix is cut off or not a varint") != std::string::npos);
  }
  SUBCASE("an event whose bytes are not a JobEvent is skipped, the rest still read") {
    auto broken = std::string("\x03\xff\xff\xff") + body;
    auto decoded = amqp::decode_event_batch(broken, "application/x-protobuf");
    REQUIRE(decoded.events.size() == 2);
    CHECK(decoded.events[1].output().data() == "second");
    CHECK(decoded.error.find("event 1 (at byte 1): 3 bytes that are not a JobEvent") !=
          std::string::npos);
  }
  SUBCASE("JSON sent as protobuf") {
    auto decoded = amqp::decode_event_batch("{\"job_id\": \"j\"}", "application/x-protobuf");
    CHECK(decoded.events.empty());
    CHECK_FALSE(decoded.error.empty());
  }
  SUBCASE("a newer event format is refused") {
    auto event = output_event(0, "x");
    event.set_v(event_format_version + 1);
    auto decoded = amqp::decode_event_batch(protobuf_batch({event}), "application/x-protobuf");
    CHECK(decoded.events.empty());
    CHECK(decoded.error.find("newer than this runner reads") != std::string::npos);
  }
  SUBCASE("a content type that is neither") {
    auto decoded = amqp::decode_event_batch(body, "text/plain");
    CHECK(decoded.events.empty());
    CHECK(decoded.error.find("content type text/plain") != std::string::npos);
  }
}

TEST_CASE("event batch: JSON Lines (older nodes, --amqp-events-format json) still read") {
  std::string body;
  amqp::append_json_line(body, output_event(0, all_bytes()));
  amqp::append_json_line(body, output_event(1, "b"));
  for (const char* type : {"application/x-ndjson", ""}) {
    auto decoded = amqp::decode_event_batch(body, type);
    CHECK(decoded.error.empty());
    REQUIRE(decoded.events.size() == 2);
    CHECK(decoded.events[0].output().data() == all_bytes());
  }
  auto decoded = amqp::decode_event_batch("{not json\n" + body, "application/x-ndjson");
  CHECK(decoded.events.size() == 2);
  CHECK(decoded.error.find("line 1") != std::string::npos);
}

TEST_CASE("job follower: protobuf batches, with copies and a broken message") {
  amqp::JobFollower follower{amqp::Names{}};
  auto message = [](uint64_t first, uint64_t last) {
    amqp::Delivery delivery;
    delivery.exchange = amqp::Names{}.events_exchange;
    delivery.content_type = "application/x-protobuf";
    delivery.headers = {{"x-solstice-dispatch", "a/1"}};
    for (auto sequence = first; sequence <= last; ++sequence)
      amqp::append_delimited(delivery.body, output_event(sequence, all_bytes()));
    return delivery;
  };
  auto first = follower.accept(message(0, 2));
  REQUIRE(first.events.size() == 3);
  CHECK(first.events[2].output().data() == all_bytes());
  CHECK(first.note.empty());
  CHECK(follower.accept(message(1, 3)).events.size() == 1);
  CHECK(follower.duplicates_dropped() == 2);
  auto broken = message(4, 5);
  broken.body.resize(broken.body.size() - 1);
  auto verdict = follower.accept(broken);
  CHECK(verdict.events.size() == 1);
  CHECK(verdict.note.find("could not all be read") != std::string::npos);
  // The event lost with the broken message is counted as missing by the next one.
  auto next = follower.accept(message(6, 6));
  CHECK(next.events.size() == 1);
  CHECK(follower.missing() == 1);
}
