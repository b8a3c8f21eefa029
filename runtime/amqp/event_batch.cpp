#include "runtime/amqp/event_batch.hpp"

#include <google/protobuf/io/coded_stream.h>

#include "runtime/job/event_log.hpp"

namespace solstice::amqp {

namespace {

using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

std::string where(size_t index, size_t offset) {
  return "event " + std::to_string(index + 1) + " (at byte " + std::to_string(offset) + ")";
}

// The first problem is the one told; later ones add nothing a user can act on.
void note(DecodedBatch& batch, std::string problem) {
  if (batch.error.empty())
    batch.error = std::move(problem);
}

void check_version(DecodedBatch& batch, v1::JobEvent& event, const std::string& at) {
  if (event.v() > event_format_version) {
    note(batch, at + ": event format version " + std::to_string(event.v()) +
                  " is newer than this runner reads (" + std::to_string(event_format_version) +
                  ")");
    return;
  }
  batch.events.push_back(std::move(event));
}

void decode_delimited(std::string_view body, DecodedBatch& batch) {
  const auto* data = reinterpret_cast<const uint8_t*>(body.data());
  const std::string prefix = "a protobuf event batch of " + std::to_string(body.size()) + " bytes: ";
  size_t offset = 0;
  for (size_t index = 0; offset < body.size(); ++index) {
    CodedInputStream in{data + offset, static_cast<int>(body.size() - offset)};
    uint32_t length = 0;
    if (!in.ReadVarint32(&length))
      return note(batch, prefix + where(index, offset) + ": its length prefix is cut off or "
                                                         "not a varint");
    const auto start = offset + static_cast<size_t>(in.CurrentPosition());
    if (length > body.size() - start)
      return note(batch, prefix + where(index, offset) + ": its length prefix says " +
                           std::to_string(length) + " bytes, only " +
                           std::to_string(body.size() - start) + " remain");
    offset = start + length;
    v1::JobEvent event;
    if (!event.ParseFromArray(data + start, static_cast<int>(length))) {
      note(batch, prefix + where(index, start) + ": " + std::to_string(length) +
                    " bytes that are not a JobEvent");
      continue;
    }
    check_version(batch, event, prefix + where(index, start));
  }
}

void decode_json_lines(std::string_view body, DecodedBatch& batch) {
  size_t number = 0;
  while (!body.empty()) {
    const auto end = std::min(body.find('\n'), body.size());
    auto line = body.substr(0, end);
    body.remove_prefix(std::min(end + 1, body.size()));
    ++number;
    if (line.empty())
      continue;
    auto event = event_from_json_line(line);
    if (!event) {
      note(batch, "a JSON Lines event batch, line " + std::to_string(number) + ": " +
                    event.error().message);
      continue;
    }
    batch.events.push_back(std::move(*event));
  }
}

}  // namespace

void append_delimited(std::string& body, const v1::JobEvent& event) {
  const auto size = event.ByteSizeLong();
  const auto old = body.size();
  body.resize(old + CodedOutputStream::VarintSize32(static_cast<uint32_t>(size)) + size);
  auto* at = reinterpret_cast<uint8_t*>(body.data() + old);
  at = CodedOutputStream::WriteVarint32ToArray(static_cast<uint32_t>(size), at);
  event.SerializeWithCachedSizesToArray(at);
}

void append_json_line(std::string& body, const v1::JobEvent& event) {
  if (!body.empty())
    body += '\n';
  body += event_to_json_line(event);
}

DecodedBatch decode_event_batch(std::string_view body, std::string_view content_type) {
  DecodedBatch batch;
  // Parameters (application/x-protobuf; proto=...) do not change the framing.
  const auto type = content_type.substr(0, content_type.find(';'));
  if (type == events_protobuf_type)
    decode_delimited(body, batch);
  else if (type.empty() || type == events_json_lines_type || type == "application/json")
    decode_json_lines(body, batch);
  else
    batch.error = "an event message of content type " + std::string{content_type} +
                  ", which is neither " + std::string{events_protobuf_type} + " nor " +
                  std::string{events_json_lines_type};
  return batch;
}

}  // namespace solstice::amqp
