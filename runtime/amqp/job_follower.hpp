#pragma once
// What a follower of one job on the bus (`submit --amqp`) makes of each message
// of the job's queue (its result, or a batch of its events): the events of ONE
// run of the job, in order, each once.
//
// Copies come from a node that publishes again what the broker had not
// confirmed when its connection was lost: their sequence numbers are below the
// next one expected, and they are dropped. A second run of the job comes from a
// redelivery (its first node was lost, or lost its connection and the broker
// gave the job to another node): every message names its run (the header
// x-solstice-dispatch). The follower follows the newest run it has seen; the
// messages of an older run are dropped, so it shows one final result.
#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "runtime/amqp/amqp_client.hpp"
#include "solstice.pb.h"

namespace solstice::amqp {

class JobFollower {
 public:
  explicit JobFollower(Names names) : names_(std::move(names)) {}

  struct Verdict {
    std::vector<v1::JobEvent> events;  // to show, in order; the result comes as a result event
    std::string note;                  // to tell the user ("" none)
  };
  // One message: the job's result, or one or more of its events (event_batch.hpp).
  Verdict accept(const Delivery& delivery);

  uint64_t duplicates_dropped() const { return duplicates_; }
  uint64_t older_run_dropped() const { return older_run_; }
  uint64_t missing() const { return missing_; }

 private:
  Names names_;
  // One event of a message: shown unless it is a copy of one shown already.
  void accept_event(v1::JobEvent event, Verdict& verdict);

  std::optional<std::string> run_;  // the dispatch followed
  std::set<std::string> runs_seen_;
  uint64_t next_sequence_ = 0;
  uint64_t duplicates_ = 0, older_run_ = 0, missing_ = 0;
};

}  // namespace solstice::amqp
