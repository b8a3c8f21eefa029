#pragma once
// The sink that hands a runner node's job events to a thread outside the actor
// system (the AMQP connection's loop), with flow control: the sink only appends
// to a locked queue, so it never blocks a scheduler thread, and it answers an
// output event (sent as a request, actors/actors.hpp) only while the output held
// between the guest and the broker stays under a bound. Held means: in the outbox,
// waiting to be published, or published and not yet confirmed by the broker. The
// loop releases an event's bytes once the broker confirmed it. So a broker that
// pushes back (connection.blocked, a full confirm window, no connection at all)
// stops the guest's output at its source, as a slow terminal does, and the node
// never buffers more than the bound (plus what one request in flight carries).
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>

#include <caf/response_promise.hpp>

#include "actors/actors.hpp"

namespace solstice {

// 4 MiB of output per node: enough to keep a confirm window of a few hundred
// chunks busy, small against any job's output flood.
inline constexpr uint64_t default_max_held_output_bytes = 4ull << 20;

// The bytes an event counts against the bound (output data only: the other
// events are few and small, and a job's result must never wait).
uint64_t held_bytes_of(const v1::JobEvent& event);

class EventOutbox {
 public:
  explicit EventOutbox(uint64_t max_held_output_bytes = default_max_held_output_bytes);
  ~EventOutbox();
  EventOutbox(const EventOutbox&) = delete;
  EventOutbox& operator=(const EventOutbox&) = delete;

  // The sink's side.
  void push(v1::JobEvent event);
  bool has_room() const { return !holding_.load() || held_.load() < max_held_; }
  // No more holding back (a node that shuts down without a broker: its jobs
  // must be able to end, and nothing will be published any more).
  void stop_holding() { holding_ = false; }

  // The publishing loop's side: takes everything queued; gives back the bytes of
  // events the broker confirmed (or that were dropped).
  std::deque<v1::JobEvent> take_all();
  // Readable once an event waits to be taken (an eventfd, read by take_all): the
  // loop sleeps in poll(2) on it and on its connection instead of looking on a
  // timer. Output wakes the loop only while it says so: when it holds a batch
  // that may still grow, it sleeps until the batch is due, and only the other
  // events (states, steps, results: few, and never to be held) wake it.
  int wake_fd() const { return wake_fd_; }
  void wake_on_output(bool wake);
  void release(uint64_t bytes) { held_ -= std::min<uint64_t>(bytes, held_.load()); }
  uint64_t held_bytes() const { return held_.load(); }

  // What the flow control did, since the outbox was made: how many output
  // requests' answers were held back (the guest's output stopped at its source)
  // and for how long answers were held (wall time while at least one was), and
  // the most output bytes held at once. The node reports the change over each
  // job (amqp_node_jobs.cpp) so a benchmark or an operator sees whether the
  // broker paced a step.
  struct FlowCounts {
    uint64_t answers_held = 0;
    uint64_t held_us = 0;
  };
  FlowCounts flow_counts() const { return {answers_held_.load(), held_us_.load()}; }
  void count_answer_held() { ++answers_held_; }
  void count_time_held(uint64_t us) { held_us_ += us; }
  // The most output bytes held at once since the last call (then reset).
  uint64_t take_peak_held_bytes() { return peak_held_.exchange(held_.load()); }

 private:
  void wake();  // under mutex_

  const uint64_t max_held_;
  std::atomic<uint64_t> held_{0};
  std::atomic<bool> holding_{true};
  std::atomic<uint64_t> peak_held_{0};
  std::atomic<uint64_t> answers_held_{0};
  std::atomic<uint64_t> held_us_{0};
  std::mutex mutex_;
  std::deque<v1::JobEvent> events_;
  int wake_fd_ = -1;
  bool woken_ = false;  // wake_fd_ was written since the last take_all
  bool wake_on_output_ = true;
};

struct outbox_sink_state {
  std::shared_ptr<EventOutbox> outbox;
  // Answers to output requests not given yet, oldest first.
  std::deque<caf::response_promise> held;
  std::chrono::steady_clock::time_point holding_since;  // when `held` last became non-empty
};

// Appends every event it receives to `outbox`; answers an output request only
// while the outbox has room (it looks again every few milliseconds while it
// holds answers back). An event sent without a request is only appended.
outbox_sink_actor::behavior_type event_outbox_sink(
  outbox_sink_actor::stateful_pointer<outbox_sink_state> self,
  std::shared_ptr<EventOutbox> outbox);

}  // namespace solstice
