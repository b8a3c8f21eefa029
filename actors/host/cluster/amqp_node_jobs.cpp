#include "actors/host/cluster/amqp_node_jobs.hpp"

#include <cstdio>

#include "actors/host/cluster/cluster_commands.hpp"
#include "actors/runner_types.hpp"
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

void announce(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

}  // namespace

AmqpNodeJobs::AmqpNodeJobs(caf::actor_system& sys, const amqp::Names& names,
                           runner_node_actor node, std::shared_ptr<EventOutbox> outbox,
                           event_sink_actor sink, std::string node_name, uint32_t slots)
    : sys_(sys), names_(names), node_(std::move(node)), outbox_(std::move(outbox)),
      sink_(std::move(sink)), node_name_(std::move(node_name)), slots_(slots ? slots : 1),
      self_(sys) {}

uint32_t AmqpNodeJobs::jobs_without_result() const {
  uint32_t n = 0;
  for (const auto& [id, job] : jobs_)
    n += job.has_result ? 0 : 1;
  return n;
}

void AmqpNodeJobs::take(amqp::Client& client, const amqp::Delivery& delivery) {
  if (stopping_) {
    (void)client.reject(delivery.tag, true);
    return;
  }
  auto job = parse_job_json(delivery.body, "message", {});
  if (!job)
    return dead_letter(client, delivery, job.error().message);
  if (job->id().empty())
    job->set_id(make_job_id());
  if (auto i = jobs_.find(job->id()); i != jobs_.end()) {
    // This node's own job, given back when its connection was lost: it keeps
    // running here under the new delivery.
    announce("job " + job->id() + " delivered again: still running here");
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
  self_->request(node_, std::chrono::milliseconds(60s), run_job_atom::value, job, sink_)
    .receive([](ok_atom) {}, [&](caf::error& err) { refused = error_text(err); });
  if (refused.find(" is busy (") != std::string::npos) {
    // A job that just answered still holds its slot for a moment: try again.
    waiting_.push_front(delivery);
    retry_at_ = std::chrono::steady_clock::now() + 200ms;
    return;
  }
  if (!refused.empty())
    return dead_letter(client, delivery, refused);
  auto document = nlohmann::json::parse(delivery.body, nullptr, false);
  jobs_[job.id()] = Job{delivery.tag,
                        delivery.redelivered,
                        false,
                        delivery.correlation_id.empty() ? job.id() : delivery.correlation_id,
                        node_name_ + "/" + std::to_string(unix_now_us()),
                        document.is_object() && is_job_request(document) ? document
                                                                         : nlohmann::json{}};
  announce("job " + job.id() + " taken" + (delivery.redelivered ? " (redelivered)" : ""));
}

// Not a job: copied to the dead-letter queue with the reason, then
// acknowledged once the copy is confirmed (never requeued).
void AmqpNodeJobs::dead_letter(amqp::Client& client, const amqp::Delivery& delivery,
                               const std::string& reason) {
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
  unconfirmed_[*seq] = Unconfirmed{std::nullopt, delivery.tag};
}

amqp::Message AmqpNodeJobs::message_for(const v1::JobEvent& event, const Job& job) const {
  std::map<std::string, std::string> headers{{"x-solstice-node", node_name_},
                                             {"x-solstice-dispatch", job.dispatch}};
  if (job.redelivered)
    headers["x-solstice-redelivered"] = "true";
  const auto key = amqp::job_routing_key(event.job_id());
  // Persistent, events too: a follower's queue keeps them over a broker restart.
  if (!event.has_result())
    return amqp::Message{names_.events_exchange, key, event_to_json_line(event), headers,
                         job.correlation_id, true};
  auto result = event.result();
  result.set_redelivered(job.redelivered);
  headers["x-solstice-schema"] = job.request.is_null() ? "JobResult" : "jobresult.v1";
  return amqp::Message{
    names_.results_exchange, key,
    job.request.is_null() ? message_to_json(result) : job_result_v1_json(job.request, result),
    headers, job.correlation_id, true};
}

Result<void> AmqpNodeJobs::publish(amqp::Client& client) {
  for (auto& event : outbox_->take_all()) {
    if (auto i = jobs_.find(event.job_id()); i != jobs_.end() && event.has_result())
      i->second.has_result = true;
    pending_.push_back(std::move(event));
  }
  while (!pending_.empty() && !blocked_ && unconfirmed_.size() < confirm_window) {
    auto& event = pending_.front();
    auto i = jobs_.find(event.job_id());
    const bool dropped =
      i == jobs_.end() ||
      (stopping_ && event.has_result() && event.result().status() == v1::CANCELLED);
    if (dropped) {
      if (i != jobs_.end()) {
        // Cancelled by this node's shutdown, not by anyone who asked for the
        // job: the broker gives it to another node.
        if (i->second.delivery_tag)
          (void)client.reject(*i->second.delivery_tag, true);
        jobs_.erase(i);
      }
      outbox_->release(held_bytes_of(event));
      pending_.pop_front();
      continue;
    }
    auto seq = client.publish(message_for(event, i->second));
    if (!seq)
      return tl::unexpected(seq.error());
    unconfirmed_[*seq] = Unconfirmed{std::move(event), std::nullopt};
    pending_.pop_front();
  }
  return {};
}

void AmqpNodeJobs::answered(amqp::Client& client, const std::string& job_id) {
  auto i = jobs_.find(job_id);
  if (i == jobs_.end())
    return;
  if (i->second.delivery_tag)
    (void)client.ack(*i->second.delivery_tag);
  else
    answered_.insert(job_id);
  jobs_.erase(i);
}

void AmqpNodeJobs::settle(amqp::Client& client, const amqp::Confirm& confirm) {
  std::deque<v1::JobEvent> refused;
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
      refused.push_back(std::move(*done.event));  // published again, in order
    } else {
      outbox_->release(held_bytes_of(*done.event));
      if (done.event->has_result())
        answered(client, done.event->job_id());
    }
    i = unconfirmed_.erase(i);
  }
  pending_.insert(pending_.begin(), std::make_move_iterator(refused.begin()),
                  std::make_move_iterator(refused.end()));
}

void AmqpNodeJobs::connection_lost() {
  std::deque<v1::JobEvent> again;
  for (auto& [seq, publish] : unconfirmed_)
    if (publish.event)
      again.push_back(std::move(*publish.event));
  unconfirmed_.clear();
  pending_.insert(pending_.begin(), std::make_move_iterator(again.begin()),
                  std::make_move_iterator(again.end()));
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
