#pragma once
// A runner node: the actor a coordinator dispatches jobs to. Each job runs
// exactly like a local run (job supervisor plus the job's record in the node's
// state directory); its events are forwarded, in order, to the sink the
// coordinator gave with the job. Output events are requests all the way: the
// node answers a supervisor's output event only once its sink has answered it,
// so a submitter that stops reading holds the step (coordinator.hpp:
// output_ack_window). A job whose sink goes away (the coordinator was
// lost, or gave up on it) is cancelled, so nothing runs for nobody.
#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "actors/actors.hpp"
#include "runtime/base/error.hpp"

namespace solstice {

// What starting one job made: its supervisor (already started) and the sink
// that keeps its record.
struct launched_job {
  job_supervisor_actor supervisor;
  event_sink_actor recorder;
};

// Starts one job whose events go to `events` (and to its record). The host
// provides it (see actors/host/embedding.hpp: start_job); errors say why the
// job cannot run here (invalid for this node's configuration, unknown label, ...).
using job_launcher =
  std::function<Result<launched_job>(caf::actor_system&, const v1::JobSpec&, event_sink_actor)>;

struct runner_node_job {
  event_sink_actor sink;  // where the job's events go (the coordinator's relay)
  launched_job launched;
  uint64_t forwarded = 0;  // events forwarded so far
  bool result_sent = false;
  bool cancelled = false;
  bool sink_lost = false;  // its DOWN came: nothing waits for its acknowledgements
};

struct runner_node_state {
  static inline const char* name = "runner_node";
  runner_node_state() = default;
  std::string node_name;
  uint32_t slots = 1;
  job_launcher launcher;
  std::map<std::string, runner_node_job> jobs;  // by job id
  bool stopping = false;
};

// The node's behaviour: at most `slots` jobs at once, each started through
// `launcher`. On `stop` it cancels its jobs and quits once they have ended.
runner_node_actor::behavior_type
runner_node(runner_node_actor::stateful_pointer<runner_node_state> self, std::string node_name,
            uint32_t slots, job_launcher launcher);

}  // namespace solstice
