#pragma once
// The body of one message on the events exchange: consecutive events of one job.
//
// application/x-protobuf (what a node sends by default): each event as binary
// protobuf `JobEvent`, preceded by its length as a base-128 varint (the framing
// of protobuf's writeDelimitedTo / parseDelimitedFrom, so any protobuf library
// reads it). Output bytes travel as they are: no base64, no JSON to write on the
// node or to parse in the follower, a quarter fewer bytes for the broker.
//
// application/x-ndjson (`node --amqp-events-format json`, and what nodes sent
// before): one protobuf-JSON event per line, as in a job's events.jsonl, for
// clients that want to read events without the schema.
#include <string>
#include <string_view>
#include <vector>

#include "solstice.pb.h"

namespace solstice::amqp {

inline constexpr std::string_view events_protobuf_type = "application/x-protobuf";
inline constexpr std::string_view events_json_lines_type = "application/x-ndjson";

// Appends one event, length-delimited, to a protobuf batch.
void append_delimited(std::string& body, const v1::JobEvent& event);
// Appends one event as a JSON line to a JSON Lines batch.
void append_json_line(std::string& body, const v1::JobEvent& event);

struct DecodedBatch {
  std::vector<v1::JobEvent> events;  // every event that could be read, in order
  std::string error;                 // the first problem ("" none), saying where and why
};

// Reads a message of events by its content type (JSON Lines when it names none,
// as JSON is what a hand-made message most likely is). A protobuf batch with a
// broken length stops there; an event that does not parse is skipped (told in
// `error`) and the rest is still read.
DecodedBatch decode_event_batch(std::string_view body, std::string_view content_type);

}  // namespace solstice::amqp
