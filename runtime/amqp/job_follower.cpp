#include "runtime/amqp/job_follower.hpp"

#include <google/protobuf/util/json_util.h>

#include "runtime/amqp/event_batch.hpp"

namespace solstice::amqp {

namespace {

std::optional<v1::JobResult> result_from_json(const std::string& text) {
  v1::JobResult result;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  if (!google::protobuf::util::JsonStringToMessage(text, &result, options).ok())
    return std::nullopt;
  return result;
}

std::string header(const Delivery& delivery, const std::string& name) {
  auto i = delivery.headers.find(name);
  return i == delivery.headers.end() ? std::string{} : i->second;
}

}  // namespace

JobFollower::Verdict JobFollower::accept(const Delivery& delivery) {
  Verdict verdict;
  const auto run = header(delivery, "x-solstice-dispatch");
  const bool redelivered = header(delivery, "x-solstice-redelivered") == "true";
  if (!run_ || run != *run_) {
    if (runs_seen_.count(run)) {
      ++older_run_;
      return verdict;
    }
    if (redelivered || run_)
      verdict.note = "note: the job was delivered again (the node that had it was lost); it runs "
                     "again from the start on node " +
                     header(delivery, "x-solstice-node");
    run_ = run;
    runs_seen_.insert(run);
    next_sequence_ = 0;
  }
  v1::JobEvent event;
  if (delivery.exchange == names_.results_exchange) {
    auto result = result_from_json(delivery.body);
    if (!result) {
      verdict.note = "a result on the bus is not JobResult JSON";
      return verdict;
    }
    event.set_job_id(result->job_id());
    event.set_sequence(next_sequence_);
    *event.mutable_result() = std::move(*result);
    verdict.events.push_back(std::move(event));
    return verdict;
  }
  auto batch = decode_event_batch(delivery.body, delivery.content_type);
  if (!batch.error.empty())
    verdict.note = "events on the bus could not all be read: " + batch.error;
  for (auto& event : batch.events)
    accept_event(std::move(event), verdict);
  return verdict;
}

void JobFollower::accept_event(v1::JobEvent event, Verdict& verdict) {
  if (event.sequence() < next_sequence_) {
    ++duplicates_;
    return;
  }
  if (event.sequence() > next_sequence_) {
    missing_ += event.sequence() - next_sequence_;
    verdict.note = "warning: " + std::to_string(event.sequence() - next_sequence_) +
                   " event(s) of the job never arrived";
  }
  next_sequence_ = event.sequence() + 1;
  verdict.events.push_back(std::move(event));
}

}  // namespace solstice::amqp
