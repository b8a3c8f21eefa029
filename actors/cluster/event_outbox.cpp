#include "actors/cluster/event_outbox.hpp"

namespace solstice {

event_sink_actor::behavior_type event_outbox_sink(event_sink_actor::pointer,
                                                  std::shared_ptr<EventOutbox> outbox) {
  return {
    [outbox](event_atom, v1::JobEvent& event) { outbox->push(std::move(event)); },
  };
}

}  // namespace solstice
