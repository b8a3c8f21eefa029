#pragma once
#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor_clock.hpp>

#include "actors/actors.hpp"
#include "actors/vm/vm_attempt.hpp"
#include "runtime/job/redactor.hpp"
#include "runtime/vm/vm_slots.hpp"

namespace solstice {

struct supervisor_timeouts {
  vm_attempt_timeouts attempt;
  std::chrono::milliseconds transfer{std::chrono::minutes(30)};
  // How long a failed SSH operation waits for the attempt's report that the VM
  // is gone, which names the real cause.
  std::chrono::milliseconds lost_report_grace{500};
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

// Where the job is. Each phase accepts only the messages that make sense in it;
// the rest are logged as unexpected and change nothing.
enum class job_phase {
  created,           // `start` not received yet
  queued,            // waiting for one of the host's VM slots
  templating,        // finding (or building) the template the VM is restored from
  start_queue,       // a clone waits for one of the host's start slots (max_concurrent_starts)
  booting,           // a VM attempt prepares, boots and waits for SSH
  retiring_attempt,  // KVM could not run the guest, or a restore failed: the attempt
                     // ends, a TCG (or cold) one follows
  console_handoff,   // the attempt stops the console tailer, then hands out the shell
  setup,             // the runner's set-up command in the guest
  uploads,           // the job's files go into the guest
  steps,             // the job's steps, one after another
  artifacts,         // files come back from the guest
  debug_hold,        // debug-on-failure: the failed VM stays up for the user
  shutting_down,     // the attempt ends the VM and removes its files
  ended,             // the result is out
};

const char* to_string(job_phase phase);

struct job_supervisor_state {
  static inline const char* name = "job_supervisor";
  // Not an aggregate: CAF would otherwise try to build the state from `self`.
  job_supervisor_state() = default;

  // What the job is.
  v1::JobSpec job;
  v1::ImageSpec image;
  v1::RunnerConfig config;
  std::vector<event_sink_actor> sinks;
  vm_child_factory factory;
  supervisor_timeouts timeouts;
  std::vector<std::string> secrets;

  job_phase phase = job_phase::created;
  uint64_t event_sequence = 0;

  // The current VM attempt and, once handed off, its guest shell.
  vm_attempt_actor attempt;
  uint32_t attempt_number = 0;
  // Every attempt made, told to stop should the supervisor end abnormally.
  std::shared_ptr<std::vector<caf::actor>> attempts = std::make_shared<std::vector<caf::actor>>();
  guest_shell_actor shell;
  v1::VmHandle vm;
  enum class vm_status { none, up, lost } vm_state = vm_status::none;
  // Held by the supervisor and every attempt's children: returns the job's
  // freed memory to the system once the last of them has ended.
  std::shared_ptr<ReturnFreedMemory> memory_trim = std::make_shared<ReturnFreedMemory>();

  // The decision: the first one wins.
  std::optional<v1::JobStatus> status;
  std::string error;
  // An SSH failure held for lost_report_grace: the attempt may say why.
  std::optional<std::string> held_error;

  // Timers, each identified by a token.
  uint64_t next_token = 2;  // token 1 is the job deadline
  caf::actor_clock::time_point deadline;
  uint64_t slot_token = 0;
  uint64_t debug_token = 0;
  uint64_t held_token = 0;
  uint64_t start_token = 0;       // polls the start slots
  uint64_t start_hold_token = 0;  // a start slot is not held longer than start_hold_limit
  uint64_t start_tail_token = 0;  // nor longer than start_tail once the guest is ready

  // The template keeper asked for this job's template (ended once it answered).
  template_keeper_actor keeper;

  // The host-wide VM slot this job holds while its VM exists.
  std::optional<VmSlot> slot;
  bool said_waiting = false;
  // The host-wide start slot a restored job holds from its restore until its first
  // output, a second after its guest is ready at most (or start_hold_limit):
  // CPU-bound starts beyond the cores only share them.
  std::optional<VmSlot> start_slot;
  bool said_waiting_to_start = false;

  // What the result will say.
  v1::JobResult result;
  uint64_t artifact_bytes = 0;  // downloaded so far, against artifacts_max_bytes
  std::map<std::string, std::chrono::steady_clock::time_point> phase_started;
  std::deque<std::string> console_tail;
  std::string debug_key_path;
  std::string debug_known_hosts_path;

  // The running step and its two redacted streams.
  std::optional<unsigned> running_step;
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

// The supervisor's own interface: the public one, what its VM attempt and SSH
// executor tell it, and its timers (which only it sends).
using job_supervisor_internal = job_supervisor_actor::extend_with<
  attempt_observer_actor, output_observer_actor>::extend<caf::reacts_to<timeout_atom, uint64_t>>;

// Runs one job: a slot, a VM attempt (a second one on TCG when "auto" chose a KVM
// that cannot run the guest), the console hand-off, set-up, uploads, steps,
// artifacts, shutdown, cleanup; every transition an event to `sinks`, the last
// event the result. `image` is the resolved image. Send `start` to begin.
job_supervisor_internal::behavior_type
job_supervisor(job_supervisor_internal::stateful_pointer<job_supervisor_state> self,
               v1::JobSpec job, v1::ImageSpec image, v1::RunnerConfig config,
               std::vector<event_sink_actor> sinks, vm_child_factory factory,
               supervisor_timeouts timeouts);

}  // namespace solstice
