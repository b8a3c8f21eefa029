#pragma once
// The runner's whole actor protocol: every typed interface, each message with a
// one-line comment. Payloads come from proto/solstice.proto (see
// protobuf_inspect.hpp) so the same messages can cross the network.
#include <cstdint>
#include <string>

#include <caf/replies_to.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include "actors/atoms.hpp"
#include "actors/protobuf_inspect.hpp"

namespace solstice {

/// Step index of the runner's own set-up command in the guest (safe to repeat).
inline constexpr uint32_t runner_setup_step = UINT32_MAX;

/// Receives a job's events, in order.
using event_sink_actor = caf::typed_actor<
  // One job event (state change, console line, output chunk, result, ...).
  caf::reacts_to<event_atom, v1::JobEvent>>;

/// What the actors around one VM report to (the job supervisor).
using vm_observer_actor = caf::typed_actor<
  // QEMU exited, by itself or killed; sent the moment it happens.
  caf::reacts_to<exited_atom, v1::ProcessExit>,
  // An asynchronous QMP event (SHUTDOWN, POWERDOWN, RESET, GUEST_PANICKED, STOP).
  caf::reacts_to<qmp_event_atom, v1::QmpEvent>,
  // One serial console line (raw bytes, no terminator) seen before the hand-off.
  caf::reacts_to<console_atom, std::string>,
  // A chunk of a running step's stdout or stderr, in order.
  caf::reacts_to<output_atom, v1::OutputChunk>>;

/// Owns the QEMU child process and everything made for the VM on the host.
using qemu_process_actor = caf::typed_actor<
  // Makes the VM's work dir, keys, seed ISO and disk overlay; replies the handle.
  caf::replies_to<prepare_atom, v1::JobSpec, v1::ImageSpec, v1::RunnerConfig>::with<v1::VmHandle>,
  // Spawns QEMU for the prepared handle; replies the handle with PID filled in.
  caf::replies_to<launch_atom>::with<v1::VmHandle>,
  // SIGKILLs QEMU (the exit is reported to the observer as usual).
  caf::reacts_to<kill_atom>,
  // Kills QEMU if still running, reaps it, removes the work dir; replies when done.
  caf::replies_to<cleanup_atom>::with<ok_atom>,
  // Internal: poll the child's exit and stderr.
  caf::reacts_to<tick_atom>>;

/// Owns the QMP socket of one VM.
using qmp_session_actor = caf::typed_actor<
  // Waits (up to the timeout, in ms) for the socket, greeting and capabilities.
  caf::replies_to<connect_atom, std::string, uint32_t>::with<ok_atom>,
  // Runs a QMP command (name, arguments as JSON text); replies "return" as JSON text.
  caf::replies_to<command_atom, std::string, std::string>::with<std::string>,
  // Internal: poll the socket.
  caf::reacts_to<tick_atom>>;

/// Owns the serial console stream during boot.
using console_tailer_actor = caf::typed_actor<
  // Drains what is buffered, emits it, closes, then replies `stopped`.
  caf::replies_to<stop_atom>::with<stopped_atom>,
  // Internal: read new console bytes.
  caf::reacts_to<tick_atom>>;

/// Owns one libssh2 session to the guest; blocking work runs on its own worker.
using ssh_executor_actor = caf::typed_actor<
  // Polls until SSH handshake + auth succeed (timeout in ms); replies ok.
  caf::replies_to<ready_atom, v1::VmHandle, uint32_t>::with<ok_atom>,
  // Uploads bytes (content, remote path, mode) over SFTP, then chmods.
  caf::replies_to<upload_atom, std::string, std::string, uint32_t>::with<ok_atom>,
  // Uploads a local file (local path, remote path, mode) over SFTP, then chmods.
  caf::replies_to<put_file_atom, std::string, std::string, uint32_t>::with<ok_atom>,
  // Downloads a remote file to a local path.
  caf::replies_to<download_atom, std::string, std::string>::with<ok_atom>,
  // Runs a step (step index, command, its stdin bytes, timeout in ms); output
  // streams to the observer as output chunks; replies the step's exit. File
  // contents and secrets go in stdin, never in the command line.
  caf::replies_to<exec_atom, uint32_t, std::string, std::string, uint32_t>::with<v1::StepResult>,
  // Cancels the operation in progress (it then fails or reports cancelled).
  caf::reacts_to<cancel_atom>,
  // The observer has handled this many bytes of output: the worker may read on.
  caf::reacts_to<ack_atom, uint64_t>,
  // Internal: the worker finished operation `id` (error text empty on success).
  caf::reacts_to<done_atom, uint64_t, std::string, v1::StepResult>,
  // Internal: the worker read a chunk of output.
  caf::reacts_to<output_atom, v1::OutputChunk>>;

/// Runs one job from spec to result: the only actor that decides.
using job_supervisor_actor = vm_observer_actor::extend<
  // Starts the job.
  caf::reacts_to<start_atom>,
  // Cancels the job: the VM is powered down, the job ends `cancelled`.
  caf::reacts_to<cancel_atom>,
  // Internal: a deadline (job, step hand-off, shutdown stage) identified by a token.
  caf::reacts_to<timeout_atom, uint64_t>>;

}  // namespace solstice

// ============================================================================
// Cluster: a coordinator and its runner nodes (actors/coordinator.hpp,
// actors/runner_node.hpp). These interfaces cross the network through
// caf::io / caf::openssl: every payload and handle below is registered in
// add_runner_types, and every request made over them has a finite timeout.
// ============================================================================
#include <map>
#include <vector>

namespace solstice {

using join_atom = caf::atom_constant<caf::atom("join")>;
using relay_atom = caf::atom_constant<caf::atom("relay")>;
using run_job_atom = caf::atom_constant<caf::atom("run_job")>;
using status_atom = caf::atom_constant<caf::atom("status")>;
using submit_atom = caf::atom_constant<caf::atom("submit")>;

/// What a runner node offers when it joins a coordinator.
struct node_offer {
  std::string name;        // unique per node process (default: host name and PID)
  uint32_t slots = 1;      // jobs at once
  uint32_t memory_mib = 0; // memory budget for all its VMs; 0 = unlimited
  // The runs_on labels it has images for, each with its image's default memory.
  std::map<std::string, uint32_t> labels;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, node_offer& x) {
  return f(caf::meta::type_name("solstice.node_offer"), x.name, x.slots, x.memory_mib, x.labels);
}

/// One job as `status` shows it.
struct cluster_job_info {
  std::string job_id;
  std::string name;
  std::string node;       // empty while queued
  std::string state;      // the last state its node reported ("RUNNING"), or "QUEUED"
  uint32_t attempt = 0;   // dispatches so far (1 = first)
  int64_t since_us = 0;   // when it was queued, or last dispatched (Unix epoch, us)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_job_info& x) {
  return f(caf::meta::type_name("solstice.cluster_job_info"), x.job_id, x.name, x.node, x.state,
           x.attempt, x.since_us);
}

/// One node as `status` shows it.
struct cluster_node_info {
  node_offer offer;
  uint32_t slots_used = 0;
  uint32_t memory_used_mib = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_node_info& x) {
  return f(caf::meta::type_name("solstice.cluster_node_info"), x.offer, x.slots_used,
           x.memory_used_mib);
}

/// The coordinator's answer to `status`.
struct cluster_status {
  std::vector<cluster_node_info> nodes;
  std::vector<cluster_job_info> queued;   // in dispatch order
  std::vector<cluster_job_info> running;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, cluster_status& x) {
  return f(caf::meta::type_name("solstice.cluster_status"), x.nodes, x.queued, x.running);
}

/// A runner node: runs the jobs a coordinator gives it exactly like a local run.
using runner_node_actor = caf::typed_actor<
  // Starts a job whose events go to the sink, the last one the result; replies
  // once it has started, or an error saying why this node cannot run it.
  caf::replies_to<run_job_atom, v1::JobSpec, event_sink_actor>::with<ok_atom>,
  // Cancels a job by id (it then ends `cancelled` as usual).
  caf::reacts_to<cancel_atom, std::string>,
  // Cancels every job, takes no more, and quits once they have all ended.
  caf::reacts_to<stop_atom>,
  // Internal: an event of one of its jobs (the node is their supervisors' sink).
  caf::reacts_to<event_atom, v1::JobEvent>>;

/// The coordinator: takes jobs, queues them, dispatches them to nodes with free
/// capacity and relays their events back to whoever submitted them.
using coordinator_actor = caf::typed_actor<
  // Queues a job (an empty id is filled in); its events go to the sink, each
  // exactly once, the last one the result. Replies the job id.
  caf::replies_to<submit_atom, v1::JobSpec, event_sink_actor>::with<std::string>,
  // A node joins (or joins again after a reconnect) with what it offers.
  caf::replies_to<join_atom, node_offer, runner_node_actor>::with<ok_atom>,
  // Cancels a queued or running job by id.
  caf::reacts_to<cancel_atom, std::string>,
  // Nodes, their slots, queued and running jobs.
  caf::replies_to<status_atom>::with<cluster_status>,
  // Internal: an event of dispatch `id`, from that dispatch's relay.
  caf::reacts_to<relay_atom, uint64_t, v1::JobEvent>,
  // Internal: queue deadlines.
  caf::reacts_to<tick_atom>>;

}  // namespace solstice
