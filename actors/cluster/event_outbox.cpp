#include "actors/cluster/event_outbox.hpp"

#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>

namespace solstice {

namespace {

// How often a sink that holds answers back looks at the outbox again: short
// against a TCG step's pace, long enough to cost nothing while a broker is away.
constexpr auto look_again = std::chrono::milliseconds(20);

void answer_while_room(outbox_sink_actor::stateful_pointer<outbox_sink_state> self) {
  auto& st = self->state;
  if (st.held.empty())
    return;
  while (!st.held.empty() && st.outbox->has_room()) {
    st.held.front().deliver(caf::unit);
    st.held.pop_front();
  }
  if (!st.held.empty()) {
    self->delayed_send(self, look_again, tick_atom::value);
    return;
  }
  st.outbox->count_time_held(static_cast<uint64_t>(
    std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() -
                                                          st.holding_since)
      .count()));
}

}  // namespace

EventOutbox::EventOutbox(uint64_t max_held_output_bytes)
    : max_held_(max_held_output_bytes), wake_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

EventOutbox::~EventOutbox() {
  if (wake_fd_ >= 0)
    ::close(wake_fd_);
}

void EventOutbox::wake() {
  if (woken_ || wake_fd_ < 0)
    return;
  const uint64_t one = 1;
  (void)!::write(wake_fd_, &one, sizeof one);
  woken_ = true;
}

void EventOutbox::push(v1::JobEvent event) {
  const auto held = held_ += held_bytes_of(event);
  for (auto peak = peak_held_.load(); held > peak && !peak_held_.compare_exchange_weak(peak, held);)
    ;
  std::lock_guard<std::mutex> lock{mutex_};
  if (wake_on_output_ || !event.has_output())
    wake();
  events_.push_back(std::move(event));
}

void EventOutbox::wake_on_output(bool wake_on_output) {
  std::lock_guard<std::mutex> lock{mutex_};
  wake_on_output_ = wake_on_output;
  if (wake_on_output && !events_.empty())
    wake();  // output that came while the loop did not listen for it
}

std::deque<v1::JobEvent> EventOutbox::take_all() {
  std::lock_guard<std::mutex> lock{mutex_};
  if (woken_) {
    uint64_t count = 0;
    (void)!::read(wake_fd_, &count, sizeof count);
    woken_ = false;
  }
  return std::exchange(events_, {});
}

uint64_t held_bytes_of(const v1::JobEvent& event) {
  return event.has_output() ? event.output().data().size() : 0;
}

outbox_sink_actor::behavior_type event_outbox_sink(
  outbox_sink_actor::stateful_pointer<outbox_sink_state> self,
  std::shared_ptr<EventOutbox> outbox) {
  self->state.outbox = std::move(outbox);
  return {
    [self](event_atom, v1::JobEvent& event) {
      auto& st = self->state;
      const bool output = event.has_output();
      st.outbox->push(std::move(event));
      const bool request = self->current_mailbox_element()->mid.is_request();
      if (!output || !request || (st.held.empty() && st.outbox->has_room()))
        return;  // answered now (an empty reply)
      st.held.push_back(self->make_response_promise());
      st.outbox->count_answer_held();
      if (st.held.size() == 1) {
        st.holding_since = std::chrono::steady_clock::now();
        self->delayed_send(self, look_again, tick_atom::value);
      }
    },
    [self](tick_atom) { answer_while_room(self); },
  };
}

}  // namespace solstice
