#pragma once
// A dispatch's relay and the acknowledgement of a job's output on its way from
// the node to the job's sinks (the submitter and its followers): the node waits
// for each output event's answer, which the coordinator gives once every sink
// still connected has answered (coordinator.hpp: output_ack_window, repeat_of).
#include <cstdint>
#include <memory>
#include <string>

#include "actors/cluster/coordinator.hpp"
#include "actors/cluster/coordinator_permissions.hpp"

namespace solstice::coordinator_relay {

using coordinator_permissions::coordinator_pointer;

// One dispatch's relay: tags the job's events with the dispatch id, so that
// events of a dispatch given up on can never be mistaken for the current one's.
// Under TLS it takes events only from the node the job was dispatched to. An
// output event (a request) is answered when the coordinator has answered it.
event_sink_actor::behavior_type relay(event_sink_actor::pointer self,
                                      coordinator_actor coordinator, uint64_t dispatch,
                                      std::string node, peer_identifier identify);

// One output event on its way to the job's sinks: answered to the node (`ack`)
// once every sink that is still there has answered it.
struct held_output {
  std::string job_id;
  uint64_t dispatch = 0;
  uint64_t node_sequence = 0;
  size_t waiting = 0;  // sinks that have not answered yet
  caf::response_promise ack;
};

// One sink has answered `held` (or stopped counting): the last one answers the
// node, and the node's repeats of the same event.
void answered(coordinator_pointer self, const std::shared_ptr<held_output>& held);

// Asks one sink for its acknowledgement of `event`, again with a repeat after each
// window without an answer while the sink stays connected. A sink that goes
// away, or refuses, stops counting: the slowest live sink paces the job.
void hold_at(coordinator_pointer self, event_sink_actor sink, v1::JobEvent event,
             std::shared_ptr<held_output> held);

}  // namespace solstice::coordinator_relay
