#include "actors/cluster/runner_node.hpp"

#include <caf/event_based_actor.hpp>
#include <caf/system_messages.hpp>

#include "actors/cluster/coordinator.hpp"
#include "actors/runner_types.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/job/job_file.hpp"

namespace solstice {

namespace {

using node_pointer = runner_node_actor::stateful_pointer<runner_node_state>;

void quit_when_drained(node_pointer self) {
  if (self->state.stopping && self->state.jobs.empty())
    self->quit();
}

void cancel_job(node_pointer self, runner_node_job& job) {
  if (job.cancelled)
    return;
  job.cancelled = true;
  self->send(job.launched.supervisor, cancel_atom::value);
}

// A supervisor ended: its slot is free again. One that ended without reporting
// a result (it crashed or was killed) gets one made for it, so its sink and its
// record never wait for a result that will not come.
void on_supervisor_down(node_pointer self, const std::string& job_id, const caf::error& reason) {
  auto& st = self->state;
  auto i = st.jobs.find(job_id);
  if (i == st.jobs.end())
    return;
  auto& job = i->second;
  if (!job.result_sent) {
    auto event = cluster_result_event(
      job_id, job.forwarded, v1::INFRASTRUCTURE_ERROR,
      "the job's supervisor on node " + st.node_name + " ended without a result (" +
        error_text(reason) + ")");
    log_job(spdlog::level::warn, job_id, "job {}: {}", job_id, event.result().error());
    self->send(job.launched.recorder, event_atom::value, event);
    self->send(job.sink, event_atom::value, event);
  }
  st.jobs.erase(i);
  quit_when_drained(self);
}

}  // namespace

runner_node_actor::behavior_type runner_node(node_pointer self, std::string node_name,
                                             uint32_t slots, job_launcher launcher) {
  auto& st = self->state;
  st.node_name = std::move(node_name);
  st.slots = slots == 0 ? 1 : slots;
  st.launcher = std::move(launcher);
  self->set_down_handler([self](caf::down_msg& msg) {
    auto& st = self->state;
    for (auto& [job_id, job] : st.jobs) {
      if (msg.source == job.launched.supervisor.address()) {
        on_supervisor_down(self, job_id, msg.reason);
        return;
      }
      // The sink is gone (the coordinator was lost or dropped the job): nobody
      // waits for this job any more.
      if (msg.source == job.sink.address()) {
        cancel_job(self, job);
        return;
      }
    }
  });
  return {
    [self](run_job_atom, const v1::JobSpec& spec,
           event_sink_actor sink) -> caf::result<ok_atom> {
      auto& st = self->state;
      if (st.stopping)
        return caf::make_error(runner_errc::invalid_input,
                               "node " + st.node_name + " is shutting down");
      if (spec.id().empty() || !sink)
        return caf::make_error(runner_errc::invalid_input, "a dispatched job needs an id and a sink");
      // A job from the network names no file on this node (runtime/job/job_file.hpp).
      if (auto self_contained = check_self_contained(spec); !self_contained)
        return caf::make_error(runner_errc::invalid_input,
                               "node " + st.node_name + " refuses job " + spec.id() + ": " +
                                 self_contained.error().message);
      if (st.jobs.count(spec.id()))
        return caf::make_error(runner_errc::invalid_input, "node " + st.node_name +
                                                             " is still running job " + spec.id());
      if (st.jobs.size() >= st.slots)
        return caf::make_error(runner_errc::invalid_input,
                               "node " + st.node_name + " is busy (" +
                                 std::to_string(st.slots) + " of " + std::to_string(st.slots) +
                                 " slots used)");
      auto launched =
        st.launcher(self->system(), spec, caf::actor_cast<event_sink_actor>(self));
      if (!launched)
        return caf::make_error(runner_errc::invalid_input,
                               "node " + st.node_name + " cannot run job " + spec.id() + ": " +
                                 launched.error().message);
      auto& job = st.jobs[spec.id()];
      job.sink = std::move(sink);
      job.launched = std::move(*launched);
      self->monitor(job.launched.supervisor);
      self->monitor(job.sink);
      log_job(spdlog::level::info, spec.id(), "job {} started on node {} ({})", spec.id(),
              st.node_name, spec.name().empty() ? "unnamed" : spec.name());
      return ok_atom::value;
    },
    [self](cancel_atom, const std::string& job_id) {
      auto i = self->state.jobs.find(job_id);
      if (i != self->state.jobs.end())
        cancel_job(self, i->second);
    },
    [self](stop_atom) {
      auto& st = self->state;
      st.stopping = true;
      for (auto& [job_id, job] : st.jobs)
        cancel_job(self, job);
      quit_when_drained(self);
    },
    [self](event_atom, v1::JobEvent& event) {
      auto i = self->state.jobs.find(event.job_id());
      if (i == self->state.jobs.end())
        return;
      auto& job = i->second;
      if (job.result_sent)
        return;
      ++job.forwarded;
      job.result_sent = event.has_result();
      if (event.has_result())
        log_job(spdlog::level::info, event.job_id(), "job {} finished on node {}: {}, exit code {}",
                event.job_id(), self->state.node_name,
                v1::JobStatus_Name(event.result().status()), event.result().exit_code());
      // An output request is answered by the job's sink, so its flow control
      // reaches the supervisor (and through it the guest).
      if (event.has_output() && self->current_mailbox_element()->mid.is_request()) {
        self->delegate(job.sink, event_atom::value, std::move(event));
        return;
      }
      self->send(job.sink, event_atom::value, std::move(event));
    },
  };
}

}  // namespace solstice
