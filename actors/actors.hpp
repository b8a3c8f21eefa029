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
  // One job event (state change, console line, output chunk, result, ...). Output
  // events come as requests: the (empty) reply is the sink's acknowledgement,
  // and a sink replies only once it has handled the event (a relay: once its own
  // sink has). An event without payload is a repeat asking again for the reply
  // to an earlier one (cluster/coordinator.hpp: repeat_of): show nothing for it.
  caf::reacts_to<event_atom, v1::JobEvent>>;

/// An event sink in front of a publisher outside the actors (the AMQP node's
/// loop, actors/cluster/event_outbox.hpp): it answers an output request only while
/// that publisher has room.
using outbox_sink_actor = event_sink_actor::extend<
  // Internal: its look-again timer while it holds answers back.
  caf::reacts_to<tick_atom>>;

// ---------------------------------------------------------------------------
// One VM attempt's children. Each reports to its own kind of observer, so a
// child can only send what it owns: the tailer no output, the executor no
// console lines. Their timers and worker messages are internal (in their own
// headers), not part of these interfaces.
// ---------------------------------------------------------------------------

/// Hears from qemu_process (the VM attempt).
using qemu_observer_actor = caf::typed_actor<
  // QEMU exited, by itself or killed; sent the moment it happens.
  caf::reacts_to<exited_atom, v1::ProcessExit>>;

/// Hears from qmp_session (the VM attempt).
using qmp_observer_actor = caf::typed_actor<
  // An asynchronous QMP event (SHUTDOWN, POWERDOWN, RESET, GUEST_PANICKED, STOP, ...).
  caf::reacts_to<qmp_event_atom, v1::QmpEvent>,
  // QEMU closed the QMP connection (why); sent once. The VM can no longer be
  // controlled: QEMU exited, or something cut the socket.
  caf::reacts_to<qmp_closed_atom, std::string>>;

/// Hears from console_tailer (the VM attempt).
using console_observer_actor = caf::typed_actor<
  // One serial console line (raw bytes, no terminator) seen before the hand-off.
  caf::reacts_to<console_atom, std::string>>;

/// Hears from ssh_executor (the job supervisor, which runs the steps).
using output_observer_actor = caf::typed_actor<
  // A chunk of a running step's stdout or stderr, in order.
  caf::reacts_to<output_atom, v1::OutputChunk>>;

/// Owns the QEMU child process and everything made for the VM on the host.
using qemu_process_actor = caf::typed_actor<
  // Makes the VM's work dir, keys, seed ISO and disk overlay for boot attempt
  // number `attempt` (its socket names are the attempt's own); replies the handle.
  caf::replies_to<prepare_atom, v1::JobSpec, v1::ImageSpec, v1::RunnerConfig,
                  uint32_t>::with<v1::VmHandle>,
  // Spawns QEMU for the prepared handle; replies the handle with PID filled in.
  caf::replies_to<launch_atom>::with<v1::VmHandle>,
  // SIGKILLs QEMU (the exit is reported to the observer as usual).
  caf::reacts_to<kill_atom>,
  // Kills QEMU if still running, reaps it, removes the work dir; replies when done.
  caf::replies_to<cleanup_atom>::with<ok_atom>>;

/// Owns the QMP socket of one VM.
using qmp_session_actor = caf::typed_actor<
  // Waits (up to the timeout, in ms) for the socket, greeting and capabilities;
  // gives up at once when QEMU (this PID) is gone.
  caf::replies_to<connect_atom, std::string, uint32_t, int32_t>::with<ok_atom>,
  // Runs a QMP command (name, arguments as JSON text); replies "return" as JSON text.
  caf::replies_to<command_atom, std::string, std::string>::with<std::string>>;

/// Owns the serial console stream during boot.
using console_tailer_actor = caf::typed_actor<
  // Drains what is buffered, emits it, closes, then replies `stopped`.
  caf::replies_to<stop_atom>::with<stopped_atom>>;

/// The guest shell: what a job's steps use. Only the VM attempt's hand-off gives
/// it out, after the console tailer has stopped (or was killed and is gone).
using guest_shell_actor = caf::typed_actor<
  // Uploads bytes (content, remote path, mode) over SFTP, then chmods.
  caf::replies_to<upload_atom, std::string, std::string, uint32_t>::with<ok_atom>,
  // Uploads a local file (local path, remote path, mode) over SFTP, then chmods.
  caf::replies_to<put_file_atom, std::string, std::string, uint32_t>::with<ok_atom>,
  // Downloads a remote file to a local path.
  caf::replies_to<download_atom, std::string, std::string, uint64_t>::with<ok_atom>,
  // Runs a step (step index, command, its stdin bytes, timeout in ms); output
  // streams to the output observer as chunks; replies the step's exit. File
  // contents and secrets go in stdin, never in the command line.
  caf::replies_to<exec_atom, uint32_t, std::string, std::string, uint32_t>::with<v1::StepResult>,
  // Cancels the operation in progress (it then fails or reports cancelled).
  caf::reacts_to<cancel_atom>,
  // The observer has handled this many bytes of output: the worker may read on.
  caf::reacts_to<ack_atom, uint64_t>,
  // The guest has the handle's own identity now (a restored clone after its set-up):
  // drops the session and connects again with the handle's key, checking its host
  // key (polling up to the timeout in ms); every later request uses that identity.
  caf::replies_to<rekey_atom, v1::VmHandle, uint32_t>::with<ok_atom>>;

/// Owns one libssh2 session to the guest; blocking work runs on its own worker.
/// It starts gated: every guest-shell request is refused until `release`.
using ssh_executor_actor = guest_shell_actor::extend<
  // Polls until SSH handshake + auth succeed (timeout in ms); replies ok.
  caf::replies_to<ready_atom, v1::VmHandle, uint32_t>::with<ok_atom>,
  // A restored clone's identity port (runtime/vm/identity_channel.hpp): connects
  // to its socket (path, timeout in ms) — before the guest runs, so that its agent
  // never sees the host side closed.
  caf::replies_to<connect_atom, std::string, uint32_t>::with<ok_atom>,
  // Gives the clone the handle's own identity (its key, host key, its job's
  // hostname and instance id, the host's clock and randomness) and its job's files
  // (the directories, the env file's text, the steps' scripts: GuestJobFiles)
  // over that port; replies once the
  // guest's agent said it is done (timeout in ms), and closes it: "" when the
  // agent made the job's files too, else why not (the set-up then makes them).
  // From then on `ready` uses the handle's own key and host key.
  caf::replies_to<identity_atom, v1::VmHandle, std::vector<std::string>, std::string,
                  std::vector<std::string>, uint32_t>::with<std::string>,
  // The console hand-off is done: guest-shell requests are served from now on.
  caf::reacts_to<release_atom>>;

/// Finds or builds the template a job's VM is restored from (runtime/vm/
/// template_build.hpp). Blocking work: spawned detached, one per job that asks.
using template_keeper_actor = caf::typed_actor<
  // (image, config, accel "kvm"/"tcg", build): the image with restore_from set to
  // its ready template — with `build`, made first when there is none (under the
  // template's lock, shared with other jobs and runners waiting for it); without,
  // restore_from left unset when there is none. The bool: this request built it.
  caf::replies_to<template_atom, v1::ImageSpec, v1::RunnerConfig, std::string, bool>::with<
    v1::ImageSpec, bool>>;

// ---------------------------------------------------------------------------
// One boot attempt and the job around it.
// ---------------------------------------------------------------------------

/// What a VM attempt tells its job supervisor while it boots and runs.
using attempt_observer_actor = caf::typed_actor<
  // The attempt entered a boot state (PREPARING, BOOTING, WAITING_FOR_SSH) + detail.
  caf::reacts_to<phase_atom, v1::JobState, std::string>,
  // One serial console line seen before the hand-off.
  caf::reacts_to<console_atom, std::string>,
  // Something the user should see (a QMP event worth telling).
  caf::reacts_to<notice_atom, std::string>,
  // A timed part of the boot begins (true) or ends (false): "identity" of a clone
  // that takes it over its identity port; the result's phases show it.
  caf::reacts_to<timing_atom, std::string, bool>,
  // The booted VM is lost (QEMU exited, QMP closed, the guest panicked or reset):
  // why, with QEMU's stderr and the console's last lines. Sent at most once.
  caf::reacts_to<lost_atom, std::string>>;

/// One boot attempt: its QEMU process, QMP session, console tailer and SSH
/// executor. A retry or a KVM->TCG fallback ends the attempt and starts another;
/// nothing of the old one reaches the new one, whose files and sockets are its own.
using vm_attempt_actor = caf::typed_actor<
  // Prepares, launches and boots the VM until SSH answers; replies the handle,
  // or an error saying why (runner_errc::kvm_unusable: KVM could not run it).
  // After an error the attempt says nothing more until `shutdown`.
  caf::replies_to<boot_atom>::with<v1::VmHandle>,
  // Stops the console tailer (its `stopped` reply, or killed and DOWN), then
  // releases the SSH executor and replies it as the guest shell.
  caf::replies_to<handoff_atom>::with<guest_shell_actor>,
  // Ends the VM — system_powerdown when `graceful`, then quit, then SIGKILL — and
  // removes its files; replies how QEMU ended ("powerdown", "quit", "kill",
  // "exited" or "none"), then quits.
  caf::replies_to<shutdown_atom, bool>::with<std::string>>;

/// Runs one job from spec to result: the only actor that decides.
using job_supervisor_actor = caf::typed_actor<
  // Starts the job.
  caf::reacts_to<start_atom>,
  // Cancels the job: the VM is powered down, the job ends `cancelled`.
  caf::reacts_to<cancel_atom>>;

}  // namespace solstice

// ============================================================================
// Cluster: a coordinator and its runner nodes (actors/cluster/coordinator.hpp,
// actors/cluster/runner_node.hpp). These interfaces cross the network through
// caf::io / caf::openssl: every payload and handle below is registered in
// add_runner_types, and every request made over them has a finite timeout.
// ============================================================================
#include <map>
#include <vector>

namespace solstice {


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
  // Cancels a queued or running job by id (under TLS: its submitter, or an operator).
  caf::reacts_to<cancel_atom, std::string>,
  // Sends a queued or running job's events from now on to the sink too (under
  // TLS: its submitter, or an operator).
  caf::replies_to<follow_atom, std::string, event_sink_actor>::with<ok_atom>,
  // Nodes, their slots, queued and running jobs (under TLS a submitter sees its own jobs only).
  caf::replies_to<status_atom>::with<cluster_status>,
  // Internal: an event of dispatch `id`, from that dispatch's relay.
  caf::reacts_to<relay_atom, uint64_t, v1::JobEvent>,
  // Internal: queue deadlines.
  caf::reacts_to<tick_atom>>;

}  // namespace solstice
