// The job supervisor: one job's lifecycle as explicit phases (job_phase). The VM
// itself is a vm_attempt's business; this file decides and reports: events, the
// decision and shutdown, the boot and hand-off, then the behaviour. What runs in
// the guest (set-up, uploads, steps, artifacts, output) is in job_steps.cpp.
// Nearly 600 lines: the lifecycle reads top to bottom here; splitting it further
// would cut one phase machine in two.
#include "actors/vm/job_supervisor.hpp"
#include "actors/vm/job_supervisor_parts.hpp"

#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <utility>

#include <caf/actor_system.hpp>
#include <caf/exit_reason.hpp>
#include <caf/send.hpp>
#include <caf/system_messages.hpp>
#include <spdlog/spdlog.h>

#include "runtime/base/logging.hpp"
#include "runtime/base/metrics.hpp"

#include "actors/runner_types.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/guest_commands.hpp"
#include "runtime/job/job_result.hpp"
#include "runtime/job/job_started.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

ReturnFreedMemory::~ReturnFreedMemory() { ::malloc_trim(0); }

const char* to_string(job_phase phase) {
  switch (phase) {
    case job_phase::created: return "created";
    case job_phase::queued: return "queued";
    case job_phase::templating: return "templating";
    case job_phase::start_queue: return "start_queue";
    case job_phase::booting: return "booting";
    case job_phase::retiring_attempt: return "retiring_attempt";
    case job_phase::console_handoff: return "console_handoff";
    case job_phase::setup: return "setup";
    case job_phase::uploads: return "uploads";
    case job_phase::steps: return "steps";
    case job_phase::artifacts: return "artifacts";
    case job_phase::debug_hold: return "debug_hold";
    case job_phase::shutting_down: return "shutting_down";
    case job_phase::ended: return "ended";
  }
  return "?";
}

namespace supervision {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using phase = job_phase;

constexpr uint64_t job_deadline_token = 1;
// The job deadline is checked at least this often (one long timer would keep a
// finished supervisor alive until it fired).
constexpr std::chrono::seconds deadline_check{10};

void unexpected(supervisor_pointer self, const std::string& what) {
  log_job(spdlog::level::debug, self->state.job.id(), "{} in phase {}: ignored", what,
          to_string(self->state.phase));
}

// Phases in which the job's outcome is still open.
bool undecided(phase p) { return p < phase::debug_hold; }

// ------------------------------------------------------------------ events

void emit(supervisor_pointer self, v1::JobEvent event) {
  auto& st = self->state;
  event.set_v(event_format_version);
  event.set_job_id(st.job.id());
  event.set_sequence(st.event_sequence++);
  event.set_timestamp_us(unix_now_us());
  if (event.has_job_started())
    metrics().job_started();
  else if (event.has_result())
    metrics().job_ended(event.result());
  for (auto& sink : st.sinks)
    self->send(sink, event_atom::value, event);
}

std::string redact_text(const job_supervisor_state& st, const std::string& text) {
  return st.secrets.empty() ? text : redact(text, st.secrets);
}

void set_state(supervisor_pointer self, v1::JobState state, const std::string& detail) {
  log_job(spdlog::level::debug, self->state.job.id(), "state {}{}{}", v1::JobState_Name(state),
          detail.empty() ? "" : ": ", redact_text(self->state, detail));
  v1::JobEvent event;
  event.mutable_state()->set_state(state);
  event.mutable_state()->set_detail(redact_text(self->state, detail));
  emit(self, std::move(event));
}

void notice(supervisor_pointer self, const std::string& message) {
  v1::JobEvent event;
  event.mutable_notice()->set_message(redact_text(self->state, message));
  emit(self, std::move(event));
}

void error_event(supervisor_pointer self, const std::string& message) {
  v1::JobEvent event;
  event.mutable_error()->set_message(message);
  emit(self, std::move(event));
}

void begin_phase(supervisor_pointer self, const std::string& name) {
  self->state.phase_started[name] = std::chrono::steady_clock::now();
}

void end_phase(supervisor_pointer self, const std::string& name) {
  auto& st = self->state;
  auto i = st.phase_started.find(name);
  if (i == st.phase_started.end())
    return;
  auto* timing = st.result.add_phases();
  timing->set_phase(name);
  timing->set_duration_ms(
    std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - i->second).count());
  st.phase_started.erase(i);
}

std::string with_console_tail(const job_supervisor_state& st, const std::string& message) {
  std::string out = message;
  if (!st.console_tail.empty()) {
    out += "\nlast console lines:";
    for (const auto& line : st.console_tail)
      out += "\n  | " + line;
  }
  return out;
}

// ------------------------------------------------------------------ the end

void finish(supervisor_pointer self, const std::string& shutdown_method) {
  auto& st = self->state;
  st.phase = phase::ended;
  end_phase(self, "shutdown");
  // A step still running when the VM went (cancel, timeout) was interrupted, not skipped.
  if (st.running_step) {
    v1::StepResult interrupted;
    interrupted.set_outcome(v1::STEP_CANCELLED);
    step_finished(self, *st.running_step, std::move(interrupted));
  }
  if (!st.debug_key_path.empty()) {
    ::unlink(st.debug_key_path.c_str());
    ::unlink(st.debug_known_hosts_path.c_str());
  }
  st.slot.reset();  // the VM is gone: its slot is free
  st.start_slot.reset();
  if (st.keeper)     // a template still being built goes on; its answer is not needed
    self->send_exit(st.keeper, caf::exit_reason::user_shutdown);
  set_state(self, v1::CLEANED_UP);
  complete_result(st.job, st.status.value_or(v1::INFRASTRUCTURE_ERROR), st.error, shutdown_method,
                  st.console_tail, st.result);
  v1::JobEvent event;
  *event.mutable_result() = st.result;
  emit(self, std::move(event));
  self->quit();
}

void shut_down_vm(supervisor_pointer self) {
  auto& st = self->state;
  st.phase = phase::shutting_down;
  set_state(self, v1::SHUTTING_DOWN);
  begin_phase(self, "shutdown");
  if (!st.attempt)
    return finish(self, "none");
  auto limit = seconds(std::max<uint32_t>(st.config.powerdown_timeout_seconds(), 1) + 120);
  // A restored clone is quit, not powered down: its disk is thrown away and its
  // output and artifacts are in already, so the guest has nothing to save, and an
  // ACPI power-down of an emulated guest costs seconds of the job's wall time.
  // A cold boot keeps the graceful power-down of the design's decision.
  const bool graceful = st.vm.incoming_state().empty();
  self->request(st.attempt, limit, shutdown_atom::value, graceful)
    .then([=](std::string& method) { finish(self, method); },
          [=](caf::error& err) {
            auto& st = self->state;
            if (st.error.empty())
              st.error = error_text(err);
            // Whatever is left of the attempt ends now; its QEMU dies with it.
            self->send_exit(st.attempt, caf::exit_reason::kill);
            finish(self, "kill");
          });
}

// debug-on-failure: keep the failed VM up and say how to get in.
bool hold_for_debugging(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.job.debug_on_failure().enabled() || st.status == v1::SUCCEEDED ||
      st.status == v1::CANCELLED || st.vm_state != job_supervisor_state::vm_status::up)
    return false;
  auto key = fs::path(st.vm.job_dir()) / "debug-key";
  auto known = fs::path(st.vm.job_dir()) / "debug-known-hosts";
  SshKeyPair pair;
  pair.private_openssh = st.vm.private_key();
  if (auto ok = write_private_key(pair, key); !ok) {
    notice(self, "debug-on-failure: " + ok.error().message);
    return false;
  }
  st.debug_key_path = key.string();
  st.debug_known_hosts_path = known.string();
  int fd = ::open(known.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd >= 0) {
    auto line = "[127.0.0.1]:" + std::to_string(st.vm.ssh_port()) + " " +
                st.vm.host_key_public() + "\n";
    (void)!::write(fd, line.data(), line.size());
    ::close(fd);
  }
  auto keep = st.job.debug_on_failure().keep_seconds() ? st.job.debug_on_failure().keep_seconds()
                                                       : 600u;
  notice(self, "debug-on-failure: the VM stays up for " + std::to_string(keep) +
                 " s (cancel to end it now). Get in with:\n  ssh -i " + key.string() +
                 " -o UserKnownHostsFile=" + known.string() + " -p " +
                 std::to_string(st.vm.ssh_port()) + " " + st.vm.user() + "@127.0.0.1");
  st.phase = phase::debug_hold;
  st.debug_token = st.next_token++;
  self->delayed_send(self, seconds(keep), timeout_atom::value, st.debug_token);
  return true;
}

// Decides the job's outcome (the first decision wins) and moves to shutdown.
void decide(supervisor_pointer self, v1::JobStatus status, const std::string& message) {
  auto& st = self->state;
  if (!undecided(st.phase))
    return;
  st.status = status;
  if (!message.empty()) {
    st.error = redact_text(st, message);
    error_event(self, st.error);
  }
  if (st.shell)
    self->send(st.shell, cancel_atom::value);
  if (hold_for_debugging(self))
    return;
  shut_down_vm(self);
}

void infrastructure_error(supervisor_pointer self, const std::string& message) {
  decide(self, v1::INFRASTRUCTURE_ERROR, message);
}

// An SSH operation failed while the VM may be going away: wait briefly for the
// attempt's `lost` report, which names the real cause.
void shell_failure(supervisor_pointer self, const std::string& message) {
  auto& st = self->state;
  if (!undecided(st.phase) || st.held_error)
    return;
  if (st.vm_state == job_supervisor_state::vm_status::lost)
    return;  // decided by the `lost` report already
  st.held_error = message;
  st.held_token = st.next_token++;
  self->delayed_send(self, st.timeouts.lost_report_grace, timeout_atom::value, st.held_token);
}

}  // namespace supervision

namespace {

using namespace supervision;
namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using phase = job_phase;

// ------------------------------------------------------------------ boot

}  // namespace

namespace supervision {

std::string boot_phase_name(const job_supervisor_state& st) {
  return st.image.has_restore_from() ? "restore" : "boot_to_ssh";
}

void retire_attempt(supervisor_pointer self, std::function<void()> next) {
  auto& st = self->state;
  st.phase = phase::retiring_attempt;
  auto retired = st.attempt;
  auto go_on = [=] {
    if (self->state.phase != phase::retiring_attempt)
      return unexpected(self, "retired attempt ended");
    next();
  };
  self->request(retired, seconds(60), shutdown_atom::value, false)
    .then([=](std::string&) { go_on(); },
          [=](caf::error& err) {
            self->send_exit(retired, caf::exit_reason::kill);
            notice(self, "the retired VM attempt did not end cleanly: " + error_text(err));
            go_on();
          });
}

}  // namespace supervision

namespace {

// "auto" chose KVM and KVM could not run the guest: this attempt ends whole (its
// QEMU, sockets, files and child actors) and a fresh one boots on TCG.
void fall_back_to_tcg(supervisor_pointer self, const std::string& reason) {
  auto& st = self->state;
  end_phase(self, "prepare");
  end_phase(self, boot_phase_name(st));
  rename_retired_kvm_phases(st.result);
  metrics().boot_fallback();
  // The job's notice says it to its watcher; the log has it for `--log-level debug`.
  log_job(spdlog::level::debug, st.job.id(), "{}; falling back to TCG", redact_text(st, reason));
  notice(self, reason + "; falling back to TCG, which is slower");
  st.config.set_accel("tcg");
  // A template is made for one accelerator: TCG boots cold.
  if (st.image.has_restore_from()) {
    st.image.clear_restore_from();
    st.result.set_start("cold");
    st.result.set_start_note("KVM could not run the guest");
  }
  retire_attempt(self, [=] { start_attempt(self); });
}

bool auto_accel(const job_supervisor_state& st) {
  return st.config.accel().empty() || st.config.accel() == "auto";
}

void boot_failed(supervisor_pointer self, const caf::error& err) {
  auto& st = self->state;
  if (st.phase != phase::booting)
    return unexpected(self, "boot failure (" + error_text(err) + ")");
  bool kvm = err == runner_errc::kvm_unusable;
  if (kvm && auto_accel(st))
    return fall_back_to_tcg(self, error_text(err));
  if (restore_failed(self, err))
    return;
  infrastructure_error(
    self, error_text(err) + (kvm ? std::string{" — use --accel tcg or auto"} : std::string{}));
}

void hand_off_console(supervisor_pointer self) {
  auto& st = self->state;
  st.phase = phase::console_handoff;
  set_state(self, v1::CONSOLE_HANDOFF);
  begin_phase(self, "console_handoff");
  self->request(st.attempt, st.timeouts.attempt.console_stop + seconds(10), handoff_atom::value)
    .then(
      [=](guest_shell_actor& shell) {
        if (self->state.phase != phase::console_handoff)
          return unexpected(self, "guest shell");
        self->state.shell = std::move(shell);
        set_up_guest(self);
      },
      [=](caf::error& err) {
        if (self->state.phase != phase::console_handoff)
          return unexpected(self, "hand-off failure");
        infrastructure_error(self, "console hand-off failed: " + error_text(err));
      });
}

}  // namespace

void supervision::start_attempt(supervisor_pointer self) {
  auto& st = self->state;
  st.phase = phase::booting;
  vm_attempt_spec spec{st.job, st.image, st.config, ++st.attempt_number};
  st.attempt = self->spawn(vm_attempt, std::move(spec), st.factory, st.timeouts.attempt,
                           attempt_observer_actor{self}, output_observer_actor{self},
                           std::shared_ptr<void>(st.memory_trim));
  self->monitor(st.attempt);
  st.attempts->push_back(caf::actor_cast<caf::actor>(st.attempt));
  self->request(st.attempt, caf::infinite, boot_atom::value)
    .then(
      [=](v1::VmHandle& vm) {
        auto& st = self->state;
        if (st.phase != phase::booting)
          return unexpected(self, "booted VM");
        st.vm = std::move(vm);
        st.vm_state = job_supervisor_state::vm_status::up;
        end_phase(self, boot_phase_name(st));
        end_phase(self, "ssh_ready");
        hand_off_console(self);
      },
      [=](caf::error& err) { boot_failed(self, err); });
}

namespace {

// Waits (polling, never blocking) for one of the host's VM slots.
void acquire_slot(supervisor_pointer self) {
  auto& st = self->state;
  auto max = st.config.max_concurrent_vms();
  if (max == 0)
    return choose_start(self);
  auto slot = VmSlot::try_acquire(st.config.state_dir(), max);
  if (!slot)
    return infrastructure_error(self, slot.error().message);
  if (slot->has_value()) {
    st.slot = std::move(*slot);
    return choose_start(self);
  }
  if (!st.said_waiting) {
    st.said_waiting = true;
    notice(self, "waiting in the queue: all " + std::to_string(max) +
                   " VM slots of this host are in use (max_concurrent_vms)");
  }
  st.slot_token = st.next_token++;
  self->delayed_send(self, milliseconds(250), timeout_atom::value, st.slot_token);
}

// ------------------------------------------------------------------ what the attempt says

void on_attempt_phase(supervisor_pointer self, v1::JobState state, const std::string& detail) {
  if (self->state.phase != phase::booting)
    return unexpected(self, "attempt phase");
  if (state == v1::PREPARING)
    begin_phase(self, "prepare");
  if (state == v1::BOOTING) {
    end_phase(self, "prepare");
    begin_phase(self, boot_phase_name(self->state));
  }
  set_state(self, state, detail);
}

// A clone that takes its identity over its identity port: `restore` ends when its
// guest runs, `identity` is that exchange, `ssh_ready` the one SSH handshake after
// it (with the job's key), so the phases add up to the start.
void on_attempt_timing(supervisor_pointer self, const std::string& name, bool begins) {
  if (self->state.phase != phase::booting)
    return unexpected(self, "attempt timing");
  if (begins) {
    end_phase(self, boot_phase_name(self->state));
    begin_phase(self, name);
  } else {
    end_phase(self, name);
    begin_phase(self, "ssh_ready");
  }
}

void on_console_line(supervisor_pointer self, std::string& line) {
  auto& st = self->state;
  line = redact_text(st, line);
  st.console_tail.push_back(line);
  if (st.console_tail.size() > console_tail_lines)
    st.console_tail.pop_front();
  v1::JobEvent event;
  event.mutable_console()->set_line(std::move(line));
  emit(self, std::move(event));
}

void on_vm_lost(supervisor_pointer self, const std::string& why) {
  auto& st = self->state;
  st.vm_state = job_supervisor_state::vm_status::lost;
  st.held_error.reset();  // the real cause is known now
  if (st.phase == phase::debug_hold)
    return shut_down_vm(self);
  if (!undecided(st.phase))
    return unexpected(self, "VM lost");
  infrastructure_error(self, why);
}

void on_timeout(supervisor_pointer self, uint64_t token) {
  auto& st = self->state;
  if (token == job_deadline_token) {
    if (st.phase == phase::ended)
      return;
    auto now = self->clock().now();
    if (now < st.deadline || !undecided(st.phase)) {
      auto next = now < st.deadline ? std::min<caf::actor_clock::duration_type>(st.deadline - now, deadline_check)
                                    : caf::actor_clock::duration_type{deadline_check};
      self->delayed_send(self, next, timeout_atom::value, job_deadline_token);
      return;
    }
    return decide(self, v1::TIMED_OUT,
                  "job timed out after " + std::to_string(st.job.timeout_seconds()) + " s");
  }
  if (token == st.slot_token && st.phase == phase::queued)
    return acquire_slot(self);
  if (token == st.start_token && st.phase == phase::start_queue)
    return start_when_free(self);
  if (token == st.start_hold_token || token == st.start_tail_token)
    return start_done(self);
  if (token == st.debug_token && st.phase == phase::debug_hold)
    return shut_down_vm(self);
  if (token == st.held_token && st.held_error && undecided(st.phase))
    return infrastructure_error(self, with_console_tail(st, *std::exchange(st.held_error, {})));
}

// ------------------------------------------------------------------ start and cancel

void on_start(supervisor_pointer self) {
  auto& st = self->state;
  if (st.phase != phase::created)
    return unexpected(self, "start");
  auto timeout = st.job.timeout_seconds()                 ? st.job.timeout_seconds()
                 : st.config.default_job_timeout_seconds() ? st.config.default_job_timeout_seconds()
                                                           : 3600u;
  st.job.set_timeout_seconds(timeout);
  st.deadline = self->clock().now() + seconds(timeout);
  self->delayed_send(self,
                     std::min<caf::actor_clock::duration_type>(seconds(timeout), deadline_check),
                     timeout_atom::value, job_deadline_token);
  // The first event says what runs where, for integrators reading the stream.
  st.result.set_started_at_us(unix_now_us());
  v1::JobEvent started;
  *started.mutable_job_started() = job_started_for(st.job, st.image);
  emit(self, std::move(started));
  st.phase = phase::queued;
  set_state(self, v1::QUEUED);
  acquire_slot(self);
}

void on_cancel(supervisor_pointer self) {
  auto& st = self->state;
  switch (st.phase) {
    case phase::created: return unexpected(self, "cancel");
    case phase::debug_hold: return shut_down_vm(self);
    case phase::shutting_down:
      // Asked again: skip the power button, quit QEMU now.
      if (st.attempt)
        caf::anon_send(st.attempt, shutdown_atom::value, false);  // its reply goes nowhere
      return;
    case phase::ended: return unexpected(self, "cancel");
    default: return decide(self, v1::CANCELLED, "cancelled");
  }
}

void on_down(supervisor_pointer self, const caf::down_msg& down) {
  auto& st = self->state;
  if (down.source != st.attempt.address())
    return unexpected(self, "DOWN of a retired attempt");
  if (st.phase == phase::ended || st.phase == phase::shutting_down ||
      st.phase == phase::retiring_attempt)
    return;  // the shutdown reply (or its error) says how it ended
  st.attempt = nullptr;
  st.vm_state = job_supervisor_state::vm_status::lost;
  if (st.phase == phase::debug_hold)
    return shut_down_vm(self);
  infrastructure_error(self, "the VM attempt stopped unexpectedly: " + caf::to_string(down.reason));
}

}  // namespace

job_supervisor_internal::behavior_type
job_supervisor(supervision::supervisor_pointer self, v1::JobSpec job, v1::ImageSpec image,
               v1::RunnerConfig config, std::vector<event_sink_actor> sinks,
               vm_child_factory factory, supervisor_timeouts timeouts) {
  auto& st = self->state;
  st.job = std::move(job);
  st.image = std::move(image);
  st.config = std::move(config);
  st.sinks = std::move(sinks);
  st.factory = std::move(factory);
  st.timeouts = timeouts;
  for (const auto& [name, value] : st.job.secrets())
    st.secrets.push_back(value);
  self->set_down_handler([=](caf::down_msg& down) { on_down(self, down); });
  // A supervisor that is killed takes its attempts (and so their VMs) with it.
  self->attach_functor([attempts = st.attempts](const caf::error&) {
    for (auto& attempt : *attempts)
      caf::anon_send_exit(attempt, caf::exit_reason::user_shutdown);
  });
  return {
    [=](start_atom) { on_start(self); },
    [=](cancel_atom) { on_cancel(self); },
    [=](phase_atom, v1::JobState state, const std::string& detail) {
      on_attempt_phase(self, state, detail);
    },
    [=](console_atom, std::string& line) { on_console_line(self, line); },
    [=](notice_atom, const std::string& message) { notice(self, message); },
    [=](timing_atom, const std::string& name, bool begins) { on_attempt_timing(self, name, begins); },
    [=](lost_atom, const std::string& why) { on_vm_lost(self, why); },
    [=](output_atom, const v1::OutputChunk& chunk) { on_output(self, chunk); },
    [=](timeout_atom, uint64_t token) { on_timeout(self, token); },
  };
}

}  // namespace solstice
