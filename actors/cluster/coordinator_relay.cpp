#include "actors/cluster/coordinator_relay.hpp"

#include <caf/event_based_actor.hpp>
#include <spdlog/spdlog.h>

#include "actors/runner_types.hpp"

namespace solstice {

v1::JobEvent repeat_of(const v1::JobEvent& event) {
  v1::JobEvent repeat;
  repeat.set_job_id(event.job_id());
  repeat.set_sequence(event.sequence());
  repeat.set_timestamp_us(event.timestamp_us());
  return repeat;
}

bool is_repeat(const v1::JobEvent& event) {
  return event.kind_case() == v1::JobEvent::KIND_NOT_SET;
}

namespace coordinator_relay {

using coordinator_permissions::from_dispatched_node;

event_sink_actor::behavior_type relay(event_sink_actor::pointer self,
                                      coordinator_actor coordinator, uint64_t dispatch,
                                      std::string node, peer_identifier identify) {
  return {
    [=](event_atom, v1::JobEvent& event) -> caf::result<void> {
      if (!from_dispatched_node(self, identify, node, event, dispatch))
        return caf::unit;
      const auto* element = self->current_mailbox_element();
      if (!element || !element->mid.is_request()) {
        self->send(coordinator, relay_atom::value, dispatch, std::move(event));
        return caf::unit;
      }
      auto ack = self->make_response_promise();
      // The coordinator is local: it answers, or it is gone and the error says so.
      self->request(coordinator, caf::infinite, relay_atom::value, dispatch, std::move(event))
        .then([ack]() mutable { ack.deliver(caf::unit); },
              [ack](caf::error&) mutable { ack.deliver(caf::unit); });
      return ack;
    },
  };
}

void answered(coordinator_pointer self, const std::shared_ptr<held_output>& held) {
  if (held->waiting > 0 && --held->waiting > 0)
    return;
  held->ack.deliver(caf::unit);
  auto i = self->state.jobs.find(held->job_id);
  if (i == self->state.jobs.end() || i->second.dispatch != held->dispatch)
    return;
  auto& job = i->second;
  job.unacknowledged.erase(held->node_sequence);
  auto [first, last] = job.repeats.equal_range(held->node_sequence);
  for (auto r = first; r != last; ++r)
    r->second.deliver(caf::unit);
  job.repeats.erase(first, last);
}

void hold_at(coordinator_pointer self, event_sink_actor sink, v1::JobEvent event,
             std::shared_ptr<held_output> held) {
  self->request(sink, self->state.options.ack_window, event_atom::value, event)
    .then([self, held]() { answered(self, held); },
          [self, sink, event, held](caf::error& err) {
            if (err == caf::sec::request_timeout && self->state.live_sinks.count(sink.address()))
              return hold_at(self, sink, repeat_of(event), held);
            spdlog::debug("job {}: event {} released by its sink ({}{})", held->job_id,
                          event.sequence(), error_text(err),
                          self->state.live_sinks.count(sink.address()) ? "" : ", the sink is gone");
            answered(self, held);
          });
}

}  // namespace coordinator_relay
}  // namespace solstice
