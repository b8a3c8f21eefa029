#pragma once
// The sink that hands a runner node's job events to a thread outside the actor
// system (the AMQP connection's loop): the actor only appends to a locked queue,
// so it never blocks a scheduler thread; the loop takes everything queued.
#include <deque>
#include <memory>
#include <mutex>

#include "actors/actors.hpp"

namespace solstice {

class EventOutbox {
 public:
  void push(v1::JobEvent event) {
    std::lock_guard<std::mutex> lock{mutex_};
    events_.push_back(std::move(event));
  }
  std::deque<v1::JobEvent> take_all() {
    std::lock_guard<std::mutex> lock{mutex_};
    return std::exchange(events_, {});
  }

 private:
  std::mutex mutex_;
  std::deque<v1::JobEvent> events_;
};

// Appends every event it receives to `outbox`.
event_sink_actor::behavior_type event_outbox_sink(event_sink_actor::pointer self,
                                                  std::shared_ptr<EventOutbox> outbox);

}  // namespace solstice
