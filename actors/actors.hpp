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
  // Runs a step (step index, command, timeout in ms); output streams to the
  // observer as output chunks; replies the step's exit.
  caf::replies_to<exec_atom, uint32_t, std::string, uint32_t>::with<v1::StepResult>,
  // Cancels the operation in progress (it then fails or reports cancelled).
  caf::reacts_to<cancel_atom>,
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
