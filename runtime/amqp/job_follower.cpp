#include "runtime/amqp/job_follower.hpp"

#include <google/protobuf/util/json_util.h>

#include "runtime/job/event_log.hpp"

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
    verdict.event = std::move(event);
    return verdict;
  }
  auto parsed = event_from_json_line(delivery.body);
  if (!parsed)
    return verdict;
  if (parsed->sequence() < next_sequence_) {
    ++duplicates_;
    return verdict;
  }
  if (parsed->sequence() > next_sequence_) {
    missing_ += parsed->sequence() - next_sequence_;
    verdict.note = "warning: " + std::to_string(parsed->sequence() - next_sequence_) +
                   " event(s) of the job never arrived";
  }
  next_sequence_ = parsed->sequence() + 1;
  verdict.event = std::move(*parsed);
  return verdict;
}

}  // namespace solstice::amqp
