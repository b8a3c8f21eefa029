#pragma once
// The jobs of a node on AMQP and their events on the way to the broker, across
// connections: a lost connection does not touch a running job. Its events wait
// here (and its output waits in the guest: the outbox's bound, event_outbox.hpp)
// until a connection is back; events the broker had not confirmed are published
// again (a follower drops the copies it already has by their sequence numbers).
//
// Why back-pressure and not a disk buffer: the guest holds its own output when
// nobody reads it (as with a slow terminal), so the node's memory stays bounded
// without writing a second copy of every byte to disk, and a job's events.jsonl
// (capped by events_max_bytes) stays a record, not a queue.
//
// A job is acknowledged only once its result is confirmed. A connection lost
// before that gives the job back to the broker (its delivery tag dies with the
// channel). If the broker delivers it to this node again, the node takes the new
// delivery for the job it is still running (or already answered) and runs
// nothing twice. If another node got it meanwhile, both run it: every event and
// result carries a dispatch identity (x-solstice-dispatch), the other node's
// result says `redelivered`, and a follower shows one run only.
//
// Events go out in batches: one message carries consecutive events of one job
// (length-delimited binary protobuf, or JSON Lines: runtime/amqp/event_batch.hpp;
// at most max_batch_bytes), because a persistent, confirmed message costs the broker, the node and every follower far more than its bytes. A job's
// events go at once when its last message went out at least batch_hold ago, and
// gather until then otherwise: a lone line is not held, and a flood goes out in
// a few large messages.
//
// Everything here runs on the command's own thread (rabbitmq-c blocks), never on
// an actor scheduler thread.
#include <chrono>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/scoped_actor.hpp>
#include <nlohmann/json.hpp>

#include "actors/cluster/event_outbox.hpp"
#include "actors/cluster/runner_node.hpp"
#include "runtime/amqp/amqp_client.hpp"

namespace solstice::cluster_cli {

// How a node writes its messages of events (`node --amqp-events-format`).
enum class EventsFormat { protobuf, json_lines };

class AmqpNodeJobs {
 public:
  AmqpNodeJobs(caf::actor_system& sys, const amqp::Names& names, runner_node_actor node,
               std::shared_ptr<EventOutbox> outbox, event_sink_actor sink,
               std::string node_name, uint32_t slots, EventsFormat events_format);

  // A delivery on the current connection: a new job starts (or waits for a
  // slot), a job of this node's comes back, anything else is dead-lettered.
  void take(amqp::Client& client, const amqp::Delivery& delivery);
  // How many deliveries the current connection may hold unacknowledged: the
  // slots less those held by jobs of an earlier connection that still run (their
  // deliveries died with it). 0: none, so do not consume yet.
  uint16_t prefetch_wanted() const;
  // Starts waiting deliveries while there are free slots.
  void start_waiting(amqp::Client& client);
  // Publishes what the jobs produced, as far as the confirm window and the
  // broker allow (a batch that may still grow waits); an error: the
  // connection is unusable.
  Result<void> publish(amqp::Client& client);
  // How long the connection's loop may sleep (waking early for a frame or for
  // wake_fd): until a held batch is due.
  std::chrono::milliseconds next_look() const;
  // Readable while the jobs have new events (the outbox's wake fd; -1: none).
  int wake_fd() const { return outbox_->wake_fd(); }
  // The broker confirmed (or refused) publishes.
  void settle(amqp::Client& client, const amqp::Confirm& confirm);
  void set_blocked(bool blocked) { blocked_ = blocked; }
  // The connection is gone: delivery tags die with it, unconfirmed events go
  // back to the front of the line, deliveries that waited for a slot are the
  // broker's again.
  void connection_lost();

  // Shutting down: the node's jobs end cancelled; their deliveries go back to
  // the broker instead of being answered.
  void stop();
  bool stopping() const { return stopping_; }
  size_t running() const { return jobs_.size(); }
  // Nothing left to publish or to confirm.
  bool drained() const { return pending_events() == 0 && unconfirmed_.empty(); }

 private:
  struct Job {
    std::optional<uint64_t> delivery_tag;  // on the current connection only
    bool redelivered = false;
    bool has_result = false;  // the result was seen (published or waiting to be)
    std::string correlation_id;
    std::string dispatch;  // this node's run of the job: <node>/<start time in µs>
    nlohmann::json request;  // a jobrequest.v1 (answered as jobresult.v1); null for a JobSpec
    std::chrono::steady_clock::time_point last_batch_at{};  // its last message of events
    // What its events cost and whether the broker paced it (reported once the
    // result is confirmed): the node's line "job ID answered: ...".
    struct Flow {
      uint64_t events = 0, messages = 0;
      uint64_t window_full = 0;     // rounds that left events waiting for a confirm
      uint64_t blocked = 0;         // rounds that left events waiting for the broker
      size_t peak_unconfirmed = 0;  // publishes awaiting a confirm (the node's, at most)
      EventOutbox::FlowCounts outbox_at_start;
    } flow;
  };
  // A publish the broker has not confirmed yet.
  struct Unconfirmed {
    std::vector<v1::JobEvent> events;       // a batch of events, or a result (published again if lost)
    std::optional<uint64_t> dead_lettered;  // or the copy of a poison delivery
  };
  using Events = std::deque<v1::JobEvent>;

  void start(amqp::Client& client, const amqp::Delivery& delivery, v1::JobSpec job);
  void dead_letter(amqp::Client& client, const amqp::Delivery& delivery,
                   const std::string& reason, v1::JobStatus status);
  // A job whose result the broker confirmed: acknowledged if its delivery is
  // known, else remembered for when the broker delivers it here again.
  void answered(amqp::Client& client, const std::string& job_id);
  // Publishes from the front of one job's pending events (batches, then its
  // result) while the window allows and no batch waits to grow.
  Result<void> publish_job(amqp::Client& client, const std::string& job_id, Events& events);
  // The events at the front of `events` that make the next message (0: its
  // result comes first); `complete`: the batch cannot grow any more.
  size_t batch_size(const Job& job, const Events& events, bool& complete) const;
  std::map<std::string, std::string> headers_for(const Job& job) const;
  // The line that says what a job's events cost and whether anything held them.
  std::string flow_report(const std::string& job_id, const Job& job);
  amqp::Message result_message(const v1::JobEvent& event, const Job& job) const;
  // Back to the front of their jobs' lines, in order (lost or refused publishes).
  void put_back(std::vector<v1::JobEvent> events);
  size_t pending_events() const;
  uint32_t jobs_without_result() const;

  caf::actor_system& sys_;
  const amqp::Names& names_;
  runner_node_actor node_;
  std::shared_ptr<EventOutbox> outbox_;
  event_sink_actor sink_;
  std::string node_name_;
  uint32_t slots_;
  EventsFormat events_format_;
  caf::scoped_actor self_;
  bool blocked_ = false;
  bool stopping_ = false;
  std::map<std::string, Job> jobs_;  // by job id
  std::deque<amqp::Delivery> waiting_;  // deliveries waiting for a free slot
  std::chrono::steady_clock::time_point retry_at_{};
  std::map<std::string, Events> pending_;  // by job id, in order, not published yet
  std::map<uint64_t, Unconfirmed> unconfirmed_;  // by publish sequence number
  std::set<std::string> answered_;  // answered here, the delivery not acknowledged
};

}  // namespace solstice::cluster_cli
