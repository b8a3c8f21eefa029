#pragma once
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <caf/actor_clock.hpp>

#include "actors/actors.hpp"
#include "runtime/redactor.hpp"
#include "runtime/vm_slots.hpp"

namespace solstice {

// How the supervisor makes the actors around one VM. The default spawns the real
// actors detached; tests put in their own.
struct vm_actor_factory {
  std::function<qemu_process_actor(caf::actor_system&, vm_observer_actor)> qemu;
  std::function<qmp_session_actor(caf::actor_system&, vm_observer_actor)> qmp;
  std::function<console_tailer_actor(caf::actor_system&, vm_observer_actor, std::string)> console;
  std::function<ssh_executor_actor(caf::actor_system&, vm_observer_actor)> ssh;
};

vm_actor_factory detached_vm_actors();

struct supervisor_timeouts {
  std::chrono::milliseconds prepare{std::chrono::minutes(2)};
  std::chrono::milliseconds qmp_connect{std::chrono::seconds(10)};
  // How long the console tailer has to answer `stop` before it is killed.
  std::chrono::milliseconds console_stop{std::chrono::seconds(5)};
  std::chrono::milliseconds transfer{std::chrono::minutes(30)};
  // After `quit`, and after SIGKILL, how long to wait for QEMU's exit.
  std::chrono::milliseconds quit_wait{std::chrono::seconds(5)};
  std::chrono::milliseconds kill_wait{std::chrono::seconds(5)};
};

// Every job runs on threads of its own (detached actors, the SSH worker), and
// glibc gives threads their own malloc arenas; memory a finished job freed
// stays in those arenas' pages. A host that runs job after job would grow by
// that fragmentation (measured: +10 % RSS over 50 jobs), so the job's end
// hands free pages back to the kernel with malloc_trim.
struct ReturnFreedMemory {
  ReturnFreedMemory() = default;
  ReturnFreedMemory(const ReturnFreedMemory&) = delete;
  ReturnFreedMemory& operator=(const ReturnFreedMemory&) = delete;
  ~ReturnFreedMemory();
};

struct job_supervisor_state {
  static inline const char* name = "job_supervisor";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  job_supervisor_state() = default;

  // What the job is.
  v1::JobSpec job;
  v1::ImageSpec image;
  v1::RunnerConfig config;
  std::vector<event_sink_actor> sinks;
  vm_actor_factory factory;
  supervisor_timeouts timeouts;

  // The actors around the VM.
  qemu_process_actor qemu;
  qmp_session_actor qmp;
  console_tailer_actor tailer;
  ssh_executor_actor ssh;
  v1::VmHandle vm;
  // Every child spawned, told to stop when the supervisor ends for any reason.
  std::shared_ptr<std::vector<caf::actor>> children =
    std::make_shared<std::vector<caf::actor>>();
  // Held by the supervisor and each child: returns the job's freed memory to
  // the system once the last of them has ended.
  std::shared_ptr<ReturnFreedMemory> memory_trim = std::make_shared<ReturnFreedMemory>();

  // Progress.
  bool started = false;
  v1::JobState state = v1::QUEUED;
  uint64_t event_sequence = 0;
  bool launched = false;
  // Each boot attempt's replies carry its number; a retired attempt's are ignored.
  uint32_t boot_attempt = 0;
  // "auto" chose KVM and KVM could not boot the guest: retrying on TCG.
  bool kvm_fallback = false;
  bool restarting = false;
  bool qmp_connected = false;
  bool ssh_ready = false;
  bool tailer_stopped = false;
  bool waiting_for_tailer_down = false;
  bool qemu_exited = false;
  // QEMU paused the guest (STOP without RESUME): it cannot react to the power button.
  bool vm_paused = false;
  v1::ProcessExit qemu_exit;
  std::optional<unsigned> running_step;
  bool finishing = false;      // the job's outcome is decided; only shutdown remains
  bool shutdown_started = false;
  bool cleaned_up = false;
  std::string shutdown_stage;  // powerdown, quit, kill
  uint64_t next_token = 2;     // token 1 is the job deadline
  // When the job times out, on the actor clock (checked by short chained timers:
  // one long timer would keep a finished supervisor alive until it fired).
  caf::actor_clock::time_point deadline;
  uint64_t shutdown_token = 0;
  uint64_t debug_token = 0;
  // An infrastructure error held back briefly: when QEMU dies, the SSH or QMP
  // failure it causes can arrive before QEMU's exit report, which names the cause.
  std::string held_error;
  uint64_t held_error_token = 0;
  std::string debug_key_path;
  std::string debug_known_hosts_path;

  // The host-wide VM slot this job holds while its VM exists.
  std::optional<VmSlot> slot;
  uint64_t slot_token = 0;
  bool said_waiting = false;

  // What the result will say.
  v1::JobResult result;
  std::optional<v1::JobStatus> status;
  std::string error;
  std::map<std::string, std::chrono::steady_clock::time_point> phase_started;
  std::deque<std::string> console_tail;

  // Secret redaction of the running step's two streams.
  std::vector<std::string> secrets;
  std::optional<Redactor> stdout_redactor;
  std::optional<Redactor> stderr_redactor;
  uint64_t stdout_sequence = 0;
  uint64_t stderr_sequence = 0;

  // Flow control from the sinks back to the SSH reader: output bytes each sink
  // has acknowledged (its handler ran), and how many of them the executor has
  // been credited. The executor only gets credit for bytes every sink has
  // handled, so a sink that cannot keep up slows the step instead of queueing.
  std::vector<uint64_t> sink_handled_bytes;
  uint64_t output_credited_bytes = 0;
};

// How long an SSH/QMP failure waits for a QEMU exit report that would explain it.
inline constexpr std::chrono::milliseconds exit_report_grace{500};

// Console lines kept for error reports.
inline constexpr size_t console_tail_lines = 30;

// Runs one job: prepare, boot, SSH ready, console hand-off, steps, artifacts,
// shutdown, cleanup; every transition an event to `sinks`, the last event the
// result. `image` is the resolved image (see resolve_image). Send `start` to begin.
job_supervisor_actor::behavior_type
job_supervisor(job_supervisor_actor::stateful_pointer<job_supervisor_state> self,
               v1::JobSpec job, v1::ImageSpec image, v1::RunnerConfig config,
               std::vector<event_sink_actor> sinks, vm_actor_factory factory,
               supervisor_timeouts timeouts);

}  // namespace solstice
