#include "actors/host/cluster/amqp_node_jobs.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
#include "runtime/amqp/event_batch.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/job_request.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice::cluster_cli {

using namespace std::chrono_literals;

namespace {

// Publishes in flight without a confirm: enough to stream at the broker's pace;
// their bytes count against the outbox's bound until confirmed.
constexpr size_t confirm_window = 256;

// One message of events: at most this much (estimated_event_bytes). A job's
// events go at once when its last message went out at least batch_hold ago (a
// lone line is not held), else they gather until then: a persistent message
// costs the broker far more than its bytes. Measured without a VM
// (bench/amqp_broker_cost.py), 16 MiB cost the broker 0.38-0.43 s of CPU as 200
// messages (a 40 ms hold), 0.20-0.24 s as 80 and 0.14-0.17 s as 32 (about 1.4 ms
// per message and 0.1 s for the bytes); on a 2-core machine that CPU is partly
// taken from the guest. A flood now goes out in about 10 messages a second.
// The follower's prefetch (amqp_submit_command.cpp) bounds what waits in it:
// 8 messages of this size.
constexpr uint64_t max_batch_bytes = 512 * 1024;
constexpr auto batch_hold = std::chrono::milliseconds(100);
// How long the loop sleeps at most: a frame from the broker or an event in the
// outbox (its wake fd) wakes it at once, so this only bounds how late it sees a
// signal, a node that is gone or a delivery's retry. Without a wake fd (no
// eventfd) it looks at the outbox every 5 ms instead.
constexpr auto longest_sleep = std::chrono::milliseconds(50);
constexpr auto look_without_wake_fd = std::chrono::milliseconds(5);

// What an event adds to a message: its output bytes as they are in protobuf, a
// third more in JSON's base64, plus the fields around them.
uint64_t estimated_event_bytes(const v1::JobEvent& event, EventsFormat format) {
  const auto data = held_bytes_of(event);
  return format == EventsFormat::protobuf ? data + 64 : data * 4 / 3 + 256;
}

void announce(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

}  // namespace

AmqpNodeJobs::AmqpNodeJobs(caf::actor_system& sys, const amqp::Names& names,
                           runner_node_actor node, std::shared_ptr<EventOutbox> outbox,
                           event_sink_actor sink, std::string node_name, uint32_t slots,
                           EventsFormat events_format)
    : sys_(sys), names_(names), node_(std::move(node)), outbox_(std::move(outbox)),
      sink_(std::move(sink)), node_name_(std::move(node_name)), slots_(slots ? slots : 1),
      events_format_(events_format), self_(sys) {}

uint32_t AmqpNodeJobs::jobs_without_result() const {
  uint32_t n = 0;
  for (const auto& [id, job] : jobs_)
    n += job.has_result ? 0 : 1;
  return n;
}

uint16_t AmqpNodeJobs::prefetch_wanted() const {
  uint32_t held_elsewhere = 0;
  for (const auto& [id, job] : jobs_)
    held_elsewhere += !job.delivery_tag && !job.has_result ? 1 : 0;
  return static_cast<uint16_t>(std::min<uint32_t>(held_elsewhere >= slots_ ? 0 : slots_ - held_elsewhere,
                                                  UINT16_MAX));
}

void AmqpNodeJobs::take(amqp::Client& client, const amqp::Delivery& delivery) {
  if (stopping_) {
    (void)client.reject(delivery.tag, true);
    return;
  }
  auto job = parse_job_json(delivery.body, "message", {});
  if (!job)
    return dead_letter(client, delivery, job.error().message, v1::INVALID_INPUT);
  if (job->id().empty())
    job->set_id(make_job_id());
  if (auto i = jobs_.find(job->id()); i != jobs_.end()) {
    // This node's own job, given back when its connection was lost: it keeps
    // running here under the new delivery.
    announce("job " + job->id() + " delivered again: " +
             (i->second.has_result ? "finished here, its result on the way" : "still running here"));
    i->second.delivery_tag = delivery.tag;
    return;
  }
  if (answered_.erase(job->id())) {
    announce("job " + job->id() + " delivered again: already answered here");
    (void)client.ack(delivery.tag);
    return;
  }
  if (jobs_without_result() >= slots_) {
    waiting_.push_back(delivery);
    return;
  }
  start(client, delivery, std::move(*job));
}

void AmqpNodeJobs::start_waiting(amqp::Client& client) {
  while (!waiting_.empty() && !stopping_ && jobs_without_result() < slots_ &&
         std::chrono::steady_clock::now() >= retry_at_) {
    auto delivery = std::move(waiting_.front());
    waiting_.pop_front();
    take(client, delivery);
  }
}

void AmqpNodeJobs::start(amqp::Client& client, const amqp::Delivery& delivery, v1::JobSpec job) {
  std::string refused;
  bool invalid = false;
  self_->request(node_, std::chrono::milliseconds(60s), run_job_atom::value, job, sink_)
    .receive([](ok_atom) {},
             [&](caf::error& err) {
               refused = error_text(err);
               invalid = err == runner_errc::invalid_input;
             });
  if (refused.find(" is busy (") != std::string::npos) {
    // A job that just answered still holds its slot for a moment: try again.
    waiting_.push_front(delivery);
    retry_at_ = std::chrono::steady_clock::now() + 200ms;
    return;
  }
  // A refusal for what the job asks is its submitter's to fix (exit 2), as
  // with a coordinator; anything else is the node's.
  if (!refused.empty())
    return dead_letter(client, delivery, refused,
                       invalid ? v1::INVALID_INPUT : v1::INFRASTRUCTURE_ERROR);
  auto document = nlohmann::json::parse(delivery.body, nullptr, false);
  jobs_[job.id()] = Job{delivery.tag,
                        delivery.redelivered,
                        false,
                        delivery.correlation_id.empty() ? job.id() : delivery.correlation_id,
                        node_name_ + "/" + std::to_string(unix_now_us()),
                        document.is_object() && is_job_request(document) ? document
                                                                         : nlohmann::json{},
                        {},
                        {}};
  auto& flow = jobs_[job.id()].flow;
  flow.outbox_at_start = outbox_->flow_counts();
  (void)outbox_->take_peak_held_bytes();
  announce("job " + job.id() + " taken" + (delivery.redelivered ? " (redelivered)" : ""));
}

// Not a job this node can run: copied to the dead-letter queue with the reason,
// then acknowledged once the copy is confirmed (never requeued). A message that
// names its job (an id) is answered too, with a result of `status`, so whoever
// follows the job learns why instead of waiting for a result that never comes.
void AmqpNodeJobs::dead_letter(amqp::Client& client, const amqp::Delivery& delivery,
                               const std::string& reason, v1::JobStatus status) {
  say("solstice-runner: %s\n",
      "a message is not a valid job, moved to the dead-letter queue: " + reason);
  amqp::Message copy;
  copy.exchange = "";
  copy.routing_key = names_.dead_letter_queue;
  copy.body = delivery.body;
  copy.headers = delivery.headers;
  copy.headers["x-solstice-reason"] = reason;
  copy.headers["x-solstice-node"] = node_name_;
  copy.correlation_id = delivery.correlation_id;
  auto seq = client.publish(copy);
  if (!seq) {
    (void)client.reject(delivery.tag, false);  // the queue's own dead-lettering
    return;
  }
  unconfirmed_[*seq] = Unconfirmed{{}, delivery.tag};

  auto document = nlohmann::json::parse(delivery.body, nullptr, false);
  const bool request = document.is_object() && is_job_request(document);
  const auto id_field = request ? "request_id" : "id";
  if (!document.is_object() || !document.contains(id_field) || !document[id_field].is_string() ||
      document[id_field].get<std::string>().empty())
    return;
  const auto job_id = document[id_field].get<std::string>();
  const Job job{std::nullopt,
                delivery.redelivered,
                true,
                delivery.correlation_id.empty() ? job_id : delivery.correlation_id,
                node_name_ + "/" + std::to_string(unix_now_us()),
                request ? document : nlohmann::json{},
                {},
                {}};
  auto answer = stand_in_result(job_id, 0, status, "node " + node_name_ + " refused the job: " + reason);
  if (auto result = client.publish(result_message(answer, job)))
    unconfirmed_[*result].events.push_back(std::move(answer));
}

std::map<std::string, std::string> AmqpNodeJobs::headers_for(const Job& job) const {
  std::map<std::string, std::string> headers{{"x-solstice-node", node_name_},
                                             {"x-solstice-dispatch", job.dispatch}};
  if (job.redelivered)
    headers["x-solstice-redelivered"] = "true";
  return headers;
}

amqp::Message AmqpNodeJobs::result_message(const v1::JobEvent& event, const Job& job) const {
  auto headers = headers_for(job);
  auto result = event.result();
  result.set_redelivered(job.redelivered);
  headers["x-solstice-schema"] = job.request.is_null() ? "JobResult" : "jobresult.v1";
  return amqp::Message{
    names_.results_exchange, amqp::job_routing_key(event.job_id()),
    job.request.is_null() ? message_to_json(result) : job_result_v1_json(job.request, result),
    headers, job.correlation_id, true};
}

size_t AmqpNodeJobs::batch_size(const Job& job, const Events& events, bool& complete) const {
  size_t count = 0;
  uint64_t bytes = 0;
  for (const auto& event : events) {
    if (event.has_result()) {
      complete = true;  // nothing of the job comes after its result
      return count;
    }
    bytes += estimated_event_bytes(event, events_format_);
    if (count > 0 && bytes > max_batch_bytes) {
      complete = true;
      return count;
    }
    ++count;
  }
  complete = bytes >= max_batch_bytes || stopping_ ||
             std::chrono::steady_clock::now() - job.last_batch_at >= batch_hold;
  return count;
}

Result<void> AmqpNodeJobs::publish_job(amqp::Client& client, const std::string& job_id,
                                       Events& events) {
  while (!events.empty() && !blocked_ && unconfirmed_.size() < confirm_window) {
    auto job = jobs_.find(job_id);
    if (job == jobs_.end()) {
      // Answered, or given back: nothing of it goes out any more.
      for (const auto& event : events)
        outbox_->release(held_bytes_of(event));
      events.clear();
      return {};
    }
    auto& front = events.front();
    if (front.has_result() && stopping_ && front.result().status() == v1::CANCELLED) {
      // Cancelled by this node's shutdown, not by anyone who asked for the
      // job: the broker gives it to another node.
      if (job->second.delivery_tag)
        (void)client.reject(*job->second.delivery_tag, true);
      jobs_.erase(job);
      continue;
    }
    if (front.has_result()) {
      auto seq = client.publish(result_message(front, job->second));
      if (!seq)
        return tl::unexpected(seq.error());
      unconfirmed_[*seq].events.push_back(std::move(front));
      events.pop_front();
      continue;
    }
    bool complete = false;
    const auto count = batch_size(job->second, events, complete);
    if (!complete)
      return {};  // it may still grow: next_look() comes back in time
    // Persistent, events too: a follower's queue keeps them over a broker restart.
    amqp::Message message{names_.events_exchange, amqp::job_routing_key(job_id), {},
                          headers_for(job->second), job->second.correlation_id, true};
    message.headers["x-solstice-schema"] = "JobEvent";
    if (events_format_ == EventsFormat::protobuf) {
      message.content_type = amqp::events_protobuf_type;
      for (size_t i = 0; i < count; ++i)
        amqp::append_delimited(message.body, events[i]);
    } else {
      message.content_type = amqp::events_json_lines_type;
      for (size_t i = 0; i < count; ++i)
        amqp::append_json_line(message.body, events[i]);
    }
    auto seq = client.publish(message);
    if (!seq)
      return tl::unexpected(seq.error());
    job->second.last_batch_at = std::chrono::steady_clock::now();
    auto& flow = job->second.flow;
    flow.events += count;
    ++flow.messages;
    flow.peak_unconfirmed = std::max(flow.peak_unconfirmed, unconfirmed_.size() + 1);
    auto& batch = unconfirmed_[*seq].events;
    batch.assign(std::make_move_iterator(events.begin()),
                 std::make_move_iterator(events.begin() + static_cast<long>(count)));
    events.erase(events.begin(), events.begin() + static_cast<long>(count));
  }
  if (auto job = jobs_.find(job_id); job != jobs_.end() && !events.empty()) {
    job->second.flow.blocked += blocked_ ? 1 : 0;
    job->second.flow.window_full += unconfirmed_.size() >= confirm_window ? 1 : 0;
  }
  return {};
}

Result<void> AmqpNodeJobs::publish(amqp::Client& client) {
  for (auto& event : outbox_->take_all()) {
    if (auto i = jobs_.find(event.job_id()); i != jobs_.end() && event.has_result())
      i->second.has_result = true;
    event.set_v(event_format_version);  // as in a JSON line: a reader can refuse newer ones
    auto& line = pending_[event.job_id()];
    line.push_back(std::move(event));
  }
  for (auto i = pending_.begin(); i != pending_.end();) {
    if (auto published = publish_job(client, i->first, i->second); !published)
      return published;
    i = i->second.empty() ? pending_.erase(i) : std::next(i);
  }
  // What is left waits for its batch to be due, a confirm or the broker: more
  // output need not wake the loop before then (next_look).
  outbox_->wake_on_output(pending_.empty());
  return {};
}

std::chrono::milliseconds AmqpNodeJobs::next_look() const {
  if (blocked_ || unconfirmed_.size() >= confirm_window)
    return longest_sleep;  // a confirm or the unblocking is a frame: it wakes the loop
  if (jobs_.empty() && pending_.empty())
    return longest_sleep;
  auto wait = outbox_->wake_fd() >= 0 ? longest_sleep : look_without_wake_fd;
  const auto now = std::chrono::steady_clock::now();
  for (const auto& [id, events] : pending_)
    if (auto job = jobs_.find(id); job != jobs_.end() && !events.empty())
      wait = std::min(wait, std::chrono::duration_cast<std::chrono::milliseconds>(
                              job->second.last_batch_at + batch_hold - now));
  return std::max(wait, std::chrono::milliseconds(1));
}

size_t AmqpNodeJobs::pending_events() const {
  size_t n = 0;
  for (const auto& [id, events] : pending_)
    n += events.size();
  return n;
}

void AmqpNodeJobs::put_back(std::vector<v1::JobEvent> events) {
  for (auto i = events.rbegin(); i != events.rend(); ++i) {
    auto& line = pending_[i->job_id()];
    line.push_front(std::move(*i));
  }
}

std::string AmqpNodeJobs::flow_report(const std::string& job_id, const Job& job) {
  const auto& flow = job.flow;
  const auto outbox = outbox_->flow_counts();
  return "job " + job_id + " answered: " + std::to_string(flow.events) + " events in " +
         std::to_string(flow.messages) + " messages; confirm window full " +
         std::to_string(flow.window_full) + " times (at most " +
         std::to_string(flow.peak_unconfirmed) + " of " + std::to_string(confirm_window) +
         " unconfirmed), broker blocked " + std::to_string(flow.blocked) +
         " times; output held back " +
         std::to_string(outbox.answers_held - flow.outbox_at_start.answers_held) + " times (" +
         std::to_string((outbox.held_us - flow.outbox_at_start.held_us) / 1000) +
         " ms in all), at most " + std::to_string(outbox_->take_peak_held_bytes() / 1024) +
         " KiB output held by the node";
}

void AmqpNodeJobs::answered(amqp::Client& client, const std::string& job_id) {
  auto i = jobs_.find(job_id);
  if (i == jobs_.end())
    return;
  announce(flow_report(job_id, i->second));
  if (i->second.delivery_tag)
    (void)client.ack(*i->second.delivery_tag);
  else
    answered_.insert(job_id);
  jobs_.erase(i);
}

void AmqpNodeJobs::settle(amqp::Client& client, const amqp::Confirm& confirm) {
  std::vector<v1::JobEvent> refused;
  for (auto i = unconfirmed_.begin(); i != unconfirmed_.end();) {
    if (i->first > confirm.tag || (!confirm.multiple && i->first != confirm.tag)) {
      ++i;
      continue;
    }
    auto& done = i->second;
    if (done.dead_lettered) {
      if (confirm.ack)
        (void)client.ack(*done.dead_lettered);
      else
        (void)client.reject(*done.dead_lettered, false);
    } else if (!confirm.ack) {
      for (auto& event : done.events)
        refused.push_back(std::move(event));  // published again, in order
    } else {
      for (const auto& event : done.events) {
        outbox_->release(held_bytes_of(event));
        if (event.has_result())
          answered(client, event.job_id());
      }
    }
    i = unconfirmed_.erase(i);
  }
  put_back(std::move(refused));
}

void AmqpNodeJobs::connection_lost() {
  std::vector<v1::JobEvent> again;
  for (auto& [seq, publish] : unconfirmed_)
    for (auto& event : publish.events)
      again.push_back(std::move(event));
  unconfirmed_.clear();
  put_back(std::move(again));
  for (auto& [id, job] : jobs_)
    job.delivery_tag.reset();
  waiting_.clear();
  blocked_ = false;
}

void AmqpNodeJobs::stop() {
  stopping_ = true;
  self_->send(node_, stop_atom::value);
}

}  // namespace solstice::cluster_cli
