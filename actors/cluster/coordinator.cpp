// The coordinator: queue, dispatch, node loss and retries. Who may send what is
// asked of coordinator_permissions; a dispatch's relay and how output is held
// until the job's sinks acknowledge it live in coordinator_relay. About 600 lines:
// intake, dispatch and loss all work on the one job and node table; the next
// seam to split along is the intake (take_job, take_node).
#include "actors/cluster/coordinator.hpp"
#include "actors/cluster/coordinator_permissions.hpp"
#include "actors/cluster/coordinator_relay.hpp"

#include "runtime/job/job_result.hpp"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <ctime>
#include <random>

#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>

#include <spdlog/spdlog.h>

#include "actors/runner_types.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/job/job_file.hpp"

namespace solstice {

namespace {

using namespace coordinator_permissions;
using namespace coordinator_relay;

// Memory a job is assumed to need when neither it nor the node's image says
// (the runner's own default, see resolve_image).
constexpr uint32_t default_memory_mib = 512;

std::string lower_words(std::string text) {
  for (auto& c : text)
    c = static_cast<char>(c == '_' ? ' ' : std::tolower(static_cast<unsigned char>(c)));
  return text;
}

std::string node_name(coordinator_pointer self, const std::optional<caf::actor_addr>& addr) {
  if (!addr)
    return "";
  auto i = self->state.nodes.find(*addr);
  return i == self->state.nodes.end() ? "" : i->second.offer.name;
}

// Sends one event of the job to its submitter and followers, in the job's own
// sequence. With `held`, the event is output its node waits for: it goes to
// each sink as a request, and the node hears back when all have answered.
void emit(coordinator_pointer self, coordinator_job& job, v1::JobEvent event,
          std::shared_ptr<held_output> held = nullptr) {
  event.set_job_id(job.spec.id());
  event.set_sequence(job.next_sequence++);
  if (event.timestamp_us() == 0)
    event.set_timestamp_us(unix_now_us());
  std::vector<event_sink_actor> sinks = job.followers;
  if (job.submitter)
    sinks.push_back(job.submitter);
  if (!held) {
    for (const auto& sink : sinks)
      self->send(sink, event_atom::value, event);
    return;
  }
  held->waiting = sinks.size();
  if (sinks.empty())
    return answered(self, held);
  job.unacknowledged.insert(held->node_sequence);
  for (const auto& sink : sinks)
    hold_at(self, sink, event, held);
}

void notice(coordinator_pointer self, coordinator_job& job, const std::string& text) {
  v1::JobEvent event;
  event.mutable_notice()->set_message(text);
  emit(self, job, std::move(event));
}

// Ends the current dispatch on the coordinator's side: frees the node's slot and
// memory, and retires the relay (a node still holding it then cancels the job).
void end_dispatch(coordinator_pointer self, coordinator_job& job) {
  auto& st = self->state;
  if (job.node) {
    auto i = st.nodes.find(*job.node);
    if (i != st.nodes.end()) {
      auto& node = i->second;
      node.slots_used -= std::min(node.slots_used, 1u);
      node.memory_used_mib -= std::min(node.memory_used_mib, job.memory_mib);
      node.jobs.erase(job.spec.id());
    }
    job.node.reset();
  }
  if (job.relay) {
    st.relays->erase(caf::actor_cast<caf::actor>(job.relay));
    self->send_exit(job.relay, caf::exit_reason::user_shutdown);
    job.relay = nullptr;
  }
  st.dispatches.erase(job.dispatch);
  job.dispatch = 0;
  job.memory_mib = 0;
  job.last_node_sequence.reset();
  // Nobody waits for these any more (the dispatch is over).
  for (auto& [sequence, repeat] : job.repeats)
    repeat.deliver(caf::unit);
  job.repeats.clear();
  job.unacknowledged.clear();
}

// The gauges of /metrics: the cluster's slots, VMs (dispatched jobs) and queue.
void publish_gauges(coordinator_pointer self) {
  auto& st = self->state;
  int64_t slots = 0, used = 0;
  for (const auto& [addr, node] : st.nodes) {
    slots += node.offer.slots;
    used += node.slots_used;
  }
  metrics().set_slots(slots);
  metrics().set_vms_running(used);
  metrics().set_jobs_running(static_cast<int64_t>(st.jobs.size() - st.queue.size()));
  metrics().set_jobs_queued(static_cast<int64_t>(st.queue.size()));
}

void forget_job(coordinator_pointer self, const std::string& job_id) {
  auto& st = self->state;
  st.queue.erase(std::remove(st.queue.begin(), st.queue.end(), job_id), st.queue.end());
  st.jobs.erase(job_id);
  publish_gauges(self);
}

// Ends a job from here (not from its supervisor): a result event to the
// submitter, then everything about the job is forgotten.
void end_job(coordinator_pointer self, const std::string& job_id, v1::JobStatus status,
             const std::string& error) {
  auto i = self->state.jobs.find(job_id);
  if (i == self->state.jobs.end())
    return;
  auto& job = i->second;
  end_dispatch(self, job);
  log_job(spdlog::level::info, job_id, "job {} ended {}: {}", job_id,
          lower_words(v1::JobStatus_Name(status)), error);
  auto event = cluster_result_event(job_id, 0, status, error);
  metrics().job_ended(event.result());
  emit(self, job, std::move(event));
  forget_job(self, job_id);
}

uint32_t memory_needed(const coordinator_job& job, const coordinator_node& node) {
  if (job.spec.memory_mib() != 0)
    return job.spec.memory_mib();
  if (!job.spec.runs_on().empty()) {
    auto i = node.offer.labels.find(job.spec.runs_on());
    if (i != node.offer.labels.end() && i->second != 0)
      return i->second;
  }
  return default_memory_mib;
}

bool node_can_ever_run(const coordinator_job& job, const coordinator_node& node) {
  return job.spec.runs_on().empty() || node.offer.labels.count(job.spec.runs_on()) > 0;
}

bool node_can_run_now(const coordinator_job& job, const coordinator_node& node) {
  if (!node_can_ever_run(job, node) || node.slots_used >= node.offer.slots)
    return false;
  return node.offer.memory_mib == 0 ||
         node.memory_used_mib + memory_needed(job, node) <= node.offer.memory_mib;
}

void dispatch(coordinator_pointer self, const std::string& job_id, const caf::actor_addr& where);

// Hands queued jobs, in order, to the nodes that can take them now; a job no
// node can take yet keeps its place without holding up the ones behind it.
void dispatch_queued(coordinator_pointer self) {
  auto& st = self->state;
  for (size_t i = 0; i < st.queue.size();) {
    auto& job = st.jobs.at(st.queue[i]);
    const caf::actor_addr* best = nullptr;
    const coordinator_node* best_node = nullptr;
    for (auto& [addr, node] : st.nodes) {
      if (!node_can_run_now(job, node))
        continue;
      auto free = node.offer.slots - node.slots_used;
      if (!best_node || free > best_node->offer.slots - best_node->slots_used ||
          (free == best_node->offer.slots - best_node->slots_used &&
           node.last_dispatch < best_node->last_dispatch)) {
        best = &addr;
        best_node = &node;
      }
    }
    if (!best) {
      ++i;
      continue;
    }
    auto job_id = st.queue[i];
    st.queue.erase(st.queue.begin() + static_cast<std::ptrdiff_t>(i));
    dispatch(self, job_id, *best);
  }
  publish_gauges(self);
}

void dispatch(coordinator_pointer self, const std::string& job_id, const caf::actor_addr& where) {
  auto& st = self->state;
  auto& job = st.jobs.at(job_id);
  auto& node = st.nodes.at(where);
  auto dispatch_id = st.next_dispatch++;
  job.attempts += 1;
  job.dispatch = dispatch_id;
  job.node = where;
  job.memory_mib = memory_needed(job, node);
  job.last_node_sequence.reset();
  job.state = "DISPATCHED";
  job.since_us = unix_now_us();
  node.slots_used += 1;
  node.memory_used_mib += job.memory_mib;
  node.jobs.insert(job_id);
  node.last_dispatch = dispatch_id;
  st.dispatches[dispatch_id] = job_id;
  job.relay = self->spawn(relay, caf::actor_cast<coordinator_actor>(self), dispatch_id,
                          node.offer.name, st.options.identify);
  st.relays->insert(caf::actor_cast<caf::actor>(job.relay));
  log_job(spdlog::level::info, job_id, "job {} dispatched to node {} (attempt {} of {})", job_id,
          node.offer.name, job.attempts, job.spec.retries() + 1);
  notice(self, job,
         "dispatched to node " + node.offer.name + " (attempt " + std::to_string(job.attempts) +
           " of " + std::to_string(job.spec.retries() + 1) + ")");
  auto name = node.offer.name;
  self->request(node.handle, st.options.dispatch_timeout, run_job_atom::value, job.spec, job.relay)
    .then([](ok_atom) {},
          [self, job_id, dispatch_id, name](caf::error& err) {
            auto i = self->state.jobs.find(job_id);
            // Already settled otherwise (node lost, cancelled, ...).
            if (i == self->state.jobs.end() || i->second.dispatch != dispatch_id)
              return;
            // Busy: the node has not yet freed the slot of a job whose result came
            // already. The job goes back to the front of the queue, not counted as
            // an attempt; the next tick (1 s) dispatches it again.
            if (err == runner_errc::node_unavailable && i->second.submitter) {
              auto& job = i->second;
              end_dispatch(self, job);
              job.attempts -= std::min(job.attempts, 1u);
              job.state = "QUEUED";
              notice(self, job, "node " + name + " did not take the job yet (" +
                                  error_text(err) + "); it waits in the queue");
              auto& queue = self->state.queue;
              queue.insert(queue.begin(), job_id);
              return;
            }
            // A refusal for what the job asks is the submitter's to fix (exit 2);
            // anything else (busy, lost, no answer) is the cluster's.
            auto refused = err == runner_errc::invalid_input;
            end_job(self, job_id, refused ? v1::INVALID_INPUT : v1::INFRASTRUCTURE_ERROR,
                    "node " + name + (refused ? " refused the job: " : " did not take the job: ") +
                      error_text(err));
            dispatch_queued(self);
          });
}

// A node's connection closed or timed out: its jobs end, or go back to the
// front of the queue when they allow another attempt.
void node_lost(coordinator_pointer self, const caf::actor_addr& addr, const std::string& why) {
  auto& st = self->state;
  auto i = st.nodes.find(addr);
  if (i == st.nodes.end())
    return;
  auto name = i->second.offer.name;
  auto jobs = i->second.jobs;
  spdlog::warn("node {} lost ({}); it had {} job(s)", name, why, jobs.size());
  std::vector<std::string> again;
  for (const auto& job_id : jobs) {
    auto j = st.jobs.find(job_id);
    if (j == st.jobs.end())
      continue;
    auto& job = j->second;
    end_dispatch(self, job);
    if (job.cancel_requested || !job.submitter) {
      end_job(self, job_id, v1::CANCELLED, "node " + name + " was lost while the job was cancelled");
    } else if (job.attempts <= job.spec.retries()) {
      notice(self, job,
             "node " + name + " was lost (" + why + "); dispatching the job again (attempt " +
               std::to_string(job.attempts + 1) + " of " +
               std::to_string(job.spec.retries() + 1) + ")");
      job.state = "QUEUED";
      job.since_us = unix_now_us();
      job.queued_at = std::chrono::steady_clock::now();
      again.push_back(job_id);
    } else {
      end_job(self, job_id, v1::INFRASTRUCTURE_ERROR,
              "node " + name + " was lost while running the job (" + why + ")");
    }
  }
  st.nodes.erase(i);
  // Jobs that were already running go first, in their original order.
  st.queue.insert(st.queue.begin(), again.begin(), again.end());
  dispatch_queued(self);
}

void submitter_lost(coordinator_pointer self, const caf::actor_addr& addr) {
  auto& st = self->state;
  st.live_sinks.erase(addr);
  std::vector<std::string> gone;
  for (auto& [job_id, job] : st.jobs) {
    auto& followers = job.followers;
    followers.erase(std::remove_if(followers.begin(), followers.end(),
                                   [&](const auto& f) { return f.address() == addr; }),
                    followers.end());
    if (job.submitter && job.submitter.address() == addr)
      gone.push_back(job_id);
  }
  for (const auto& job_id : gone) {
    auto& job = st.jobs.at(job_id);
    job.submitter = nullptr;
    if (!job.node) {
      log_job(spdlog::level::info, job_id, "job {} dropped from the queue: its submitter is gone",
              job_id);
      forget_job(self, job_id);
      continue;
    }
    log_job(spdlog::level::info, job_id, "job {}: its submitter is gone, cancelling it on node {}",
            job_id, node_name(self, job.node));
    job.cancel_requested = true;
    self->send(st.nodes.at(*job.node).handle, cancel_atom::value, job_id);
  }
}

// One event of dispatch `dispatch_id`, relayed from its node. Output (a
// request) is answered once the job's sinks have answered it; a repeat of output
// already relayed, once that has been answered.
caf::result<void> on_relayed(coordinator_pointer self, uint64_t dispatch_id,
                             v1::JobEvent& event) {
  auto& st = self->state;
  auto d = st.dispatches.find(dispatch_id);
  if (d == st.dispatches.end())
    return caf::unit;  // a dispatch given up on
  auto job_id = d->second;
  auto& job = st.jobs.at(job_id);
  const auto* element = self->current_mailbox_element();
  const bool is_request = element && element->mid.is_request();
  // In sequence: exactly the next one of this dispatch (its node numbers them
  // from 0); a repeat is dropped, a jump (a forged result, say) refused.
  uint64_t expected = job.last_node_sequence ? *job.last_node_sequence + 1 : 0;
  if (event.sequence() < expected) {
    if (!is_request || !is_repeat(event) || !job.unacknowledged.count(event.sequence()))
      return caf::unit;
    auto ack = self->make_response_promise();
    job.repeats.emplace(event.sequence(), ack);
    return ack;
  }
  if (event.sequence() > expected || is_repeat(event)) {
    spdlog::warn("refused event {} of job {} from node {}: {} (expected {})", event.sequence(),
                 job_id, node_name(self, job.node),
                 is_repeat(event) ? "a repeat of nothing" : "out of sequence", expected);
    return caf::unit;
  }
  job.last_node_sequence = event.sequence();
  if (event.has_state())
    job.state = v1::JobState_Name(event.state().state());
  bool done = event.has_result();
  if (done) {
    event.mutable_result()->set_job_id(job_id);
    metrics().job_ended(event.result());
    log_job(spdlog::level::info, job_id, "job {} finished on node {}: {}", job_id,
            node_name(self, job.node), lower_words(v1::JobStatus_Name(event.result().status())));
  }
  caf::result<void> reply = caf::unit;
  std::shared_ptr<held_output> held;
  if (is_request && event.has_output()) {
    held = std::make_shared<held_output>();
    held->job_id = job_id;
    held->dispatch = dispatch_id;
    held->node_sequence = event.sequence();
    held->ack = self->make_response_promise();
    reply = held->ack;
  }
  emit(self, job, std::move(event), held);
  if (done) {
    end_dispatch(self, job);
    forget_job(self, job_id);
    dispatch_queued(self);
  }
  return reply;
}

cluster_job_info job_info(coordinator_pointer self, const std::string& job_id,
                          const coordinator_job& job) {
  cluster_job_info info;
  info.job_id = job_id;
  info.name = job.spec.name();
  info.node = node_name(self, job.node);
  info.state = job.state;
  info.attempt = job.attempts;
  info.since_us = job.since_us;
  return info;
}

}  // namespace

std::string peer_loss_text(const caf::error& reason) {
  if (reason == caf::exit_reason::remote_link_unreachable)
    return "its connection closed or timed out";
  if (reason == caf::exit_reason::normal || reason == caf::exit_reason::user_shutdown)
    return "it shut down";
  return error_text(reason);
}

v1::JobEvent cluster_result_event(const std::string& job_id, uint64_t sequence,
                                  v1::JobStatus status, const std::string& error) {
  return stand_in_result(job_id, sequence, status, error);
}

namespace {

// `submit`: queues the job (its id made or checked) and dispatches what can run.
caf::result<std::string> take_job(coordinator_pointer self, v1::JobSpec& spec,
                                  event_sink_actor submitter) {
  auto& st = self->state;
  auto who = sender_identity(self, "a job");
  if (!who)
    return caf::make_error(runner_errc::invalid_input, "refused: unidentified peer");
  if (who->role != peer_role::submitter && who->role != peer_role::operator_role)
    return refuse(*who, "a job", "a " + role_text(who->role) + "'s certificate may not submit jobs");
  if (!lives_with_sender(self, submitter.address()))
    return refuse(*who, "a job", "its event sink is not the submitter's own");
  if (!submitter)
    return caf::make_error(runner_errc::invalid_input, "a job needs an event sink");
  if (spec.steps_size() == 0)
    return caf::make_error(runner_errc::invalid_input, "the job has no steps");
  if (spec.id().empty()) {
    do
      spec.set_id(make_job_id());
    while (st.jobs.count(spec.id()));
  } else if (st.jobs.count(spec.id())) {
    return caf::make_error(runner_errc::invalid_input,
                           "job id " + spec.id() + " is already queued or running");
  }
  auto job_id = spec.id();
  auto& job = st.jobs[job_id];
  job.spec = std::move(spec);
  job.owner = who->name;
  job.submitter = std::move(submitter);
  job.since_us = unix_now_us();
  job.queued_at = std::chrono::steady_clock::now();
  self->monitor(job.submitter);
  st.live_sinks.insert(job.submitter.address());
  st.queue.push_back(job_id);
  log_job(spdlog::level::info, job_id, "job {} queued ({}), position {}{}", job_id,
          job.spec.name().empty() ? "unnamed" : job.spec.name(), st.queue.size(),
          job.owner.empty() ? "" : ", submitted by " + job.owner);
  v1::JobEvent queued;
  queued.mutable_state()->set_state(v1::QUEUED);
  std::string detail = "position " + std::to_string(st.queue.size()) + " in the cluster queue";
  bool capable = std::any_of(st.nodes.begin(), st.nodes.end(), [&](const auto& entry) {
    return node_can_ever_run(job, entry.second);
  });
  if (!capable)
    detail += job.spec.runs_on().empty()
                ? "; no node has joined yet"
                : "; no node offers runs_on '" + job.spec.runs_on() + "' yet";
  queued.mutable_state()->set_detail(detail);
  emit(self, job, std::move(queued));
  dispatch_queued(self);
  return job_id;
}

// `join`: adds the node (replacing an older entry of the same name) and dispatches.
caf::result<ok_atom> take_node(coordinator_pointer self, node_offer& offer,
                               runner_node_actor handle) {
  auto& st = self->state;
  auto who = sender_identity(self, "a join");
  if (!who)
    return caf::make_error(runner_errc::invalid_input, "refused: unidentified peer");
  if (st.options.identify) {
    if (who->role != peer_role::node)
      return refuse(*who, "a join", "only a node's certificate may join as a node");
    if (offer.name != who->name)
      return refuse(*who, "a join",
                    "node name '" + offer.name + "' is not its certificate's name '" +
                      who->name + "'");
    if (!lives_with_sender(self, handle.address()))
      return refuse(*who, "a join", "its node actor is not its own");
  }
  if (!handle)
    return caf::make_error(runner_errc::invalid_input, "a node needs a handle");
  if (offer.name.empty())
    return caf::make_error(runner_errc::invalid_input, "a node needs a name");
  if (offer.slots == 0)
    return caf::make_error(runner_errc::invalid_input,
                           "node " + offer.name + " offers no slots");
  // The same node joining again over a new connection replaces its old entry.
  for (auto i = st.nodes.begin(); i != st.nodes.end(); ++i)
    if (i->second.offer.name == offer.name && i->first != handle.address()) {
      node_lost(self, i->first, "it joined again");
      break;
    }
  auto& node = st.nodes[handle.address()];
  bool rejoin = static_cast<bool>(node.handle);
  node.handle = handle;
  node.offer = std::move(offer);
  if (!rejoin)
    self->monitor(handle);
  std::string labels;
  for (const auto& [label, memory] : node.offer.labels)
    labels += (labels.empty() ? "" : ", ") + label;
  spdlog::info("node {} joined: {} slot(s), memory budget {}, labels: {}", node.offer.name,
               node.offer.slots,
               node.offer.memory_mib ? std::to_string(node.offer.memory_mib) + " MiB"
                                     : std::string{"unlimited"},
               labels.empty() ? "none" : labels);
  dispatch_queued(self);
  return ok_atom::value;
}

}  // namespace

coordinator_actor::behavior_type coordinator(coordinator_pointer self,
                                             coordinator_options options) {
  self->state.options = options;
  self->attach_functor([relays = self->state.relays](const caf::error&) {
    for (auto& relay : *relays)
      caf::anon_send_exit(relay, caf::exit_reason::user_shutdown);
  });
  self->set_down_handler([self](caf::down_msg& msg) {
    if (self->state.nodes.count(msg.source))
      node_lost(self, msg.source, peer_loss_text(msg.reason));
    else
      submitter_lost(self, msg.source);
  });
  self->delayed_send(self, options.tick_interval, tick_atom::value);
  return {
    [self](submit_atom, v1::JobSpec& spec, event_sink_actor submitter) {
      return take_job(self, spec, std::move(submitter));
    },
    [self](join_atom, node_offer& offer, runner_node_actor handle) {
      return take_node(self, offer, std::move(handle));
    },
    [self](cancel_atom, const std::string& job_id) {
      auto& st = self->state;
      auto who = sender_identity(self, "a cancel");
      if (!who)
        return;
      auto i = st.jobs.find(job_id);
      if (i == st.jobs.end())
        return;
      auto& job = i->second;
      if (!may_see(*who, job)) {
        refuse(*who, "a cancel", "job " + job_id + " is not its own");
        return;
      }
      if (!job.node) {
        end_job(self, job_id, v1::CANCELLED, "cancelled while queued");
        return;
      }
      if (job.cancel_requested)
        return;
      job.cancel_requested = true;
      notice(self, job, "cancelling the job on node " + node_name(self, job.node));
      self->send(st.nodes.at(*job.node).handle, cancel_atom::value, job_id);
    },
    [self](follow_atom, const std::string& job_id,
           event_sink_actor sink) -> caf::result<ok_atom> {
      auto& st = self->state;
      auto who = sender_identity(self, "a follow");
      if (!who)
        return caf::make_error(runner_errc::invalid_input, "refused: unidentified peer");
      auto i = st.jobs.find(job_id);
      // An unknown job and someone else's are refused alike: ids are not disclosed.
      if (i == st.jobs.end() || !may_see(*who, i->second))
        return refuse(*who, "a follow", "no job " + job_id + " of its own is queued or running");
      if (!sink || !lives_with_sender(self, sink.address()))
        return refuse(*who, "a follow", "the event sink is not the follower's own");
      i->second.followers.push_back(sink);
      self->monitor(sink);
      st.live_sinks.insert(sink.address());
      return ok_atom::value;
    },
    [self](status_atom) -> caf::result<cluster_status> {
      auto& st = self->state;
      auto who = sender_identity(self, "a status");
      if (!who)
        return caf::make_error(runner_errc::invalid_input, "refused: unidentified peer");
      if (who->role != peer_role::submitter && who->role != peer_role::operator_role)
        return refuse(*who, "a status",
                      "a " + role_text(who->role) + "'s certificate may not ask for the status");
      cluster_status status;
      for (const auto& [addr, node] : st.nodes) {
        cluster_node_info info;
        info.offer = node.offer;
        info.slots_used = node.slots_used;
        info.memory_used_mib = node.memory_used_mib;
        status.nodes.push_back(std::move(info));
      }
      for (const auto& job_id : st.queue)
        if (may_see(*who, st.jobs.at(job_id)))
          status.queued.push_back(job_info(self, job_id, st.jobs.at(job_id)));
      for (const auto& [job_id, job] : st.jobs)
        if (job.node && may_see(*who, job))
          status.running.push_back(job_info(self, job_id, job));
      return status;
    },
    [self](relay_atom, uint64_t dispatch_id, v1::JobEvent& event) -> caf::result<void> {
      if (!from_itself(self, "a relayed event"))
        return caf::unit;
      return on_relayed(self, dispatch_id, event);
    },
    [self](tick_atom) {
      if (!from_itself(self, "a tick"))
        return;
      auto& st = self->state;
      auto now = std::chrono::steady_clock::now();
      std::vector<std::string> expired;
      for (const auto& job_id : st.queue)
        if (now - st.jobs.at(job_id).queued_at >= st.options.queue_timeout)
          expired.push_back(job_id);
      for (const auto& job_id : expired)
        end_job(self, job_id, v1::INFRASTRUCTURE_ERROR,
                "no node could take the job within " +
                  std::to_string(std::chrono::duration_cast<std::chrono::seconds>(
                                   st.options.queue_timeout)
                                   .count()) +
                  " s of queueing");
      dispatch_queued(self);  // e.g. a job a busy node gave back
      self->delayed_send(self, st.options.tick_interval, tick_atom::value);
    },
  };
}

}  // namespace solstice
