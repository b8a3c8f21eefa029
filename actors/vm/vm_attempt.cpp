// One VM boot attempt (see vm_attempt.hpp). About 600 lines, one file on
// purpose: an attempt's boot, hand-off and shutdown are one phase machine over
// the same state, and reading them top to bottom is how its guarantees (one
// boot answer, silence after a failure, every child ended) can be checked. The
// restore of a template (another way to `booted`) is in vm_restore.cpp.
#include "actors/vm/vm_attempt.hpp"

#include <caf/actor_system.hpp>
#include <caf/exit_reason.hpp>
#include <caf/send.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/vm/console_tailer.hpp"
#include "actors/vm/qemu_process.hpp"
#include "actors/vm/qmp_session.hpp"
#include "actors/runner_types.hpp"
#include "actors/vm/ssh_executor.hpp"
#include "actors/vm/template_keeper.hpp"
#include "actors/vm/vm_attempt_parts.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/job/disk_limits.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/vm/qmp.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace attempt {

using std::chrono::milliseconds;
using phase = attempt_phase;

// ------------------------------------------------------------------ basics

// A reply or message that makes no sense in the current phase: logged, ignored.
void unexpected(attempt_pointer self, const char* what) {
  log_job(spdlog::level::debug, self->state.spec.job.id(),
          "vm_attempt #{}: {} in phase {}: ignored", self->state.spec.number, what,
          to_string(self->state.phase));
}

bool booting(phase p) {
  return p == phase::preparing || p == phase::launching || p == phase::connecting_qmp ||
         p == phase::reading_port || p == phase::restoring || p == phase::identifying ||
         p == phase::waiting_for_ssh;
}

bool vm_in_use(phase p) {
  return p == phase::booted || p == phase::handing_off || p == phase::handed_off;
}

bool uses_kvm(const vm_attempt_state& st) { return st.vm.accel() == "kvm"; }

template <class Handle>
Handle adopt(attempt_pointer self, Handle child) {
  auto& st = self->state;
  auto untyped = caf::actor_cast<caf::actor>(child);
  // Each child holds what must outlive all of them (the job's memory trim).
  caf::actor_cast<caf::abstract_actor*>(untyped)->attach_functor(
    [keep = st.keep_alive](const caf::error&) {});
  self->monitor(untyped);
  st.children->push_back(std::move(untyped));
  return child;
}

std::string console_tail_text(const vm_attempt_state& st) {
  std::string out;
  for (const auto& line : st.console_tail)
    out += "\n  | " + line;
  return out.empty() ? out : "\nlast console lines:" + out;
}

std::string qemu_exit_text(const v1::ProcessExit& exit) {
  auto message = "QEMU exited unexpectedly (" + exit.description() + ")";
  auto stderr_text = exit.stderr_tail();
  while (!stderr_text.empty() && (stderr_text.back() == '\n' || stderr_text.back() == ' '))
    stderr_text.pop_back();
  if (!stderr_text.empty())
    message += ": " + stderr_text;
  return message;
}

// ------------------------------------------------------------------ boot failures

// The boot failed: the one answer to `boot`. The attempt then says nothing more
// until `shutdown`, so nothing of it can reach the supervisor's next attempt.
void fail_boot(attempt_pointer self, std::string message, bool kvm_is_the_cause) {
  auto& st = self->state;
  st.phase = phase::failed;
  st.held_failure.reset();
  auto text = message + console_tail_text(st);
  auto code = runner_errc::qemu_failed;
  if (kvm_is_the_cause && uses_kvm(st)) {
    code = runner_errc::kvm_unusable;
    text = "KVM cannot run this guest: " + text;
  }
  if (st.boot_reply) {
    st.boot_reply->deliver(caf::make_error(code, text));
    st.boot_reply.reset();
  }
}

// An SSH or QMP failure while QEMU may still run: held briefly, since QEMU's
// exit report (which names the real cause) may be on its way.
void boot_problem(attempt_pointer self, const std::string& message) {
  auto& st = self->state;
  if (!booting(st.phase) || st.held_failure)
    return;
  if (st.qemu_state != vm_attempt_state::qemu_status::running) {
    fail_boot(self, message, false);
    return;
  }
  st.held_failure = message;
  st.held_token = st.next_token++;
  self->delayed_send(self, st.timeouts.exit_report_grace, timeout_atom::value, st.held_token);
}

// The booted VM went away: told once to the supervisor. `message` by value: it may
// be *held_failure, which this resets.
void vm_lost(attempt_pointer self, std::string message) {
  auto& st = self->state;
  st.held_failure.reset();
  if (st.handoff_reply) {
    st.handoff_reply->deliver(caf::make_error(runner_errc::qemu_failed, message));
    st.handoff_reply.reset();
  }
  st.phase = phase::lost;
  self->send(st.observer, lost_atom::value, message + console_tail_text(st));
}

// ------------------------------------------------------------------ boot

void tell_phase(attempt_pointer self, v1::JobState state, std::string detail) {
  self->send(self->state.observer, phase_atom::value, state, std::move(detail));
}

std::chrono::milliseconds boot_timeout_of(const vm_attempt_state& st) {
  auto seconds = st.spec.config.boot_timeout_seconds() ? st.spec.config.boot_timeout_seconds() : 300;
  return milliseconds(uint64_t{seconds} * 1000);
}

void make_ssh_executor(attempt_pointer self) {
  auto& st = self->state;
  if (!st.ssh)
    st.ssh = adopt(self, st.factory.ssh(self->system(), st.output_observer));
}

void wait_for_ssh(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::waiting_for_ssh;
  tell_phase(self, v1::WAITING_FOR_SSH, "127.0.0.1:" + std::to_string(st.vm.ssh_port()));
  make_ssh_executor(self);
  auto boot_timeout = boot_timeout_of(st);
  self->request(st.ssh, boot_timeout + std::chrono::seconds(30), ready_atom::value, st.vm,
                static_cast<uint32_t>(boot_timeout.count()))
    .then(
      [=](ok_atom) {
        auto& st = self->state;
        if (st.phase != phase::waiting_for_ssh)
          return unexpected(self, "SSH ready");
        // A problem seen meanwhile (held for QEMU's exit report) still fails the boot.
        if (st.held_failure)
          return fail_boot(self, *st.held_failure, false);
        st.phase = phase::booted;
        st.ssh_was_ready = true;
        st.boot_reply->deliver(st.vm);
        st.boot_reply.reset();
      },
      [=](caf::error& err) { boot_problem(self, "SSH did not become ready: " + error_text(err)); });
}

void read_ssh_port(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::reading_port;
  nlohmann::json args = {{"command-line", "info usernet"}};
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value,
                std::string{"human-monitor-command"}, args.dump())
    .then(
      [=](const std::string& reply) {
        auto& st = self->state;
        if (st.phase != phase::reading_port)
          return unexpected(self, "usernet reply");
        auto text = nlohmann::json::parse(reply, nullptr, false);
        auto port = parse_usernet_host_port(text.is_string() ? text.get<std::string>() : reply);
        if (!port)
          return boot_problem(self, "cannot learn the SSH port: " + port.error().message);
        st.vm.set_ssh_port(*port);
        if (!st.vm.incoming_state().empty())
          return restore_state(self);
        wait_for_ssh(self);
      },
      [=](caf::error& err) { boot_problem(self, "cannot learn the SSH port: " + error_text(err)); });
}

void connect_qmp(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::connecting_qmp;
  st.qmp = adopt(self, st.factory.qmp(self->system(), qmp_observer_actor{self}));
  self->request(st.qmp, st.timeouts.qmp_connect + std::chrono::seconds(5), connect_atom::value,
                st.vm.qmp_socket(), static_cast<uint32_t>(st.timeouts.qmp_connect.count()),
                static_cast<int32_t>(st.vm.qemu_pid()))
    .then(
      [=](ok_atom) {
        auto& st = self->state;
        if (st.phase != phase::connecting_qmp)
          return unexpected(self, "QMP connected");
        st.qmp_connected = true;
        read_ssh_port(self);
      },
      [=](caf::error& err) { boot_problem(self, error_text(err)); });
}

void launch(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::launching;
  tell_phase(self, v1::BOOTING,
             st.vm.accel() + ", " + std::to_string(st.vm.vcpus()) + " vcpus, " +
               std::to_string(st.vm.memory_mib()) + " MiB");
  // The tailer also writes the job's console.log, redacted (see console_tailer.hpp).
  console_capture capture{st.vm.console_log(), console_record_path(st.vm).string(),
                          job_secret_values(st.spec.job),
                          disk_limits_of(st.spec.config).console_max_bytes};
  st.tailer = adopt(self, st.factory.console(self->system(), console_observer_actor{self},
                                             std::move(capture)));
  self->request(st.qemu, st.timeouts.launch, launch_atom::value)
    .then(
      [=](v1::VmHandle& handle) {
        auto& st = self->state;
        if (st.phase != phase::launching)
          return unexpected(self, "launched");
        st.vm = std::move(handle);
        if (st.qemu_state == vm_attempt_state::qemu_status::not_started)
          st.qemu_state = vm_attempt_state::qemu_status::running;
        connect_qmp(self);
      },
      [=](caf::error& err) {
        if (self->state.phase == phase::launching)
          fail_boot(self, error_text(err), false);
      });
}

void prepare(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::preparing;
  tell_phase(self, v1::PREPARING, st.spec.number > 1 ? "attempt " + std::to_string(st.spec.number)
                                                      : std::string{});
  st.qemu = adopt(self, st.factory.qemu(self->system(), qemu_observer_actor{self}));
  self->request(st.qemu, st.timeouts.prepare, prepare_atom::value, st.spec.job, st.spec.image,
                st.spec.config, st.spec.number)
    .then(
      [=](v1::VmHandle& handle) {
        auto& st = self->state;
        if (st.phase != phase::preparing)
          return unexpected(self, "prepared");
        st.vm = std::move(handle);
        launch(self);
      },
      [=](caf::error& err) {
        if (self->state.phase == phase::preparing)
          fail_boot(self, error_text(err), false);
      });
}

// ------------------------------------------------------------------ hand-off

void release_executor(attempt_pointer self) {
  auto& st = self->state;
  if (st.phase != phase::handing_off)
    return;
  st.phase = phase::handed_off;
  self->send(st.ssh, release_atom::value);
  st.handoff_reply->deliver(guest_shell_actor{st.ssh});
  st.handoff_reply.reset();
}

// The console tailer must have stopped (or be gone) before the executor serves
// the guest shell, or guest output would be logged twice.
void hand_off(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::handing_off;
  if (st.tailer_gone)
    return release_executor(self);
  self->request(st.tailer, st.timeouts.console_stop, stop_atom::value)
    .then([=](stopped_atom) { release_executor(self); },
          [=](caf::error& err) {
            auto& st = self->state;
            if (st.phase != phase::handing_off)
              return;
            if (st.tailer_gone)
              return release_executor(self);
            self->send(st.observer, notice_atom::value,
                       "console tailer did not stop (" + error_text(err) + "); killing it");
            // Its DOWN message releases the executor.
            self->send_exit(st.tailer, caf::exit_reason::kill);
          });
}

// ------------------------------------------------------------------ shutdown

void reply_shutdown(attempt_pointer self, caf::expected<std::string> method) {
  auto& st = self->state;
  st.phase = phase::ended;
  for (auto& reply : st.shutdown_replies) {
    if (method)
      reply.deliver(*method);
    else
      reply.deliver(method.error());
  }
  st.shutdown_replies.clear();
  self->quit();
}

const char* to_string(shutdown_stage stage) {
  switch (stage) {
    case shutdown_stage::powerdown: return "powerdown";
    case shutdown_stage::quit: return "quit";
    case shutdown_stage::kill: return "kill";
    case shutdown_stage::cleanup: return "cleanup";
  }
  return "?";
}

// How QEMU ended, as the result says it.
std::string method_of(const vm_attempt_state& st) {
  switch (st.qemu_state) {
    case vm_attempt_state::qemu_status::not_started: return "none";
    case vm_attempt_state::qemu_status::exited: return st.ended_by;
    case vm_attempt_state::qemu_status::running: return "kill";
  }
  return "none";
}

// QEMU is gone (or never ran): remove the VM's files, then answer `shutdown`.
void clean_up(attempt_pointer self) {
  auto& st = self->state;
  auto method = method_of(st);
  st.stage = shutdown_stage::cleanup;
  if (!st.qemu)
    return reply_shutdown(self, method);
  self->request(st.qemu, st.timeouts.kill_wait + std::chrono::seconds(30), cleanup_atom::value)
    .then(
      [=](ok_atom) {
        auto& st = self->state;
        if (!st.shutdown_problem.empty())
          return reply_shutdown(self, caf::make_error(runner_errc::qemu_failed, st.shutdown_problem));
        reply_shutdown(self, method);
      },
      [=](caf::error& err) {
        reply_shutdown(self, caf::make_error(runner_errc::qemu_failed,
                                             "cleanup failed: " + error_text(err)));
      });
}

// Waits for QEMU's exit at `stage` (its deadline moves to the next stage). A
// reply that comes after QEMU exited, or after a later stage began, changes nothing.
void await_exit(attempt_pointer self, shutdown_stage stage, milliseconds wait) {
  auto& st = self->state;
  if (st.stage != stage || st.qemu_state != vm_attempt_state::qemu_status::running)
    return;
  st.stage_token = st.next_token++;
  self->delayed_send(self, wait, timeout_atom::value, st.stage_token);
}

void kill_stage(attempt_pointer self) {
  self->state.stage = shutdown_stage::kill;
  self->send(self->state.qemu, kill_atom::value);
  await_exit(self, shutdown_stage::kill, self->state.timeouts.kill_wait);
}

void quit_stage(attempt_pointer self) {
  auto& st = self->state;
  if (!st.qmp_connected)
    return kill_stage(self);
  st.stage = shutdown_stage::quit;
  // QEMU closes the socket as it quits: a lost reply is normal here.
  auto wait = [=] { await_exit(self, shutdown_stage::quit, self->state.timeouts.quit_wait); };
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value, std::string{"quit"},
                std::string{"{}"})
    .then([=](const std::string&) { wait(); }, [=](caf::error&) { wait(); });
}

void powerdown_stage(attempt_pointer self) {
  auto& st = self->state;
  st.stage = shutdown_stage::powerdown;
  auto wait = milliseconds(uint64_t{std::max<uint32_t>(st.spec.config.powerdown_timeout_seconds(), 1)} * 1000);
  // A guest that never got as far as SSH is unlikely to handle the power button:
  // give it a short chance, not the full timeout.
  if (!st.ssh_was_ready)
    wait = std::min(wait, milliseconds(3000));
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value,
                std::string{"system_powerdown"}, std::string{"{}"})
    .then([=](const std::string&) { await_exit(self, shutdown_stage::powerdown, wait); },
          [=](caf::error&) {
            auto& st = self->state;
            if (st.stage == shutdown_stage::powerdown &&
                st.qemu_state == vm_attempt_state::qemu_status::running)
              quit_stage(self);
          });
}

void shut_down(attempt_pointer self, bool graceful) {
  auto& st = self->state;
  if (st.phase == phase::ended)
    return;
  if (st.phase == phase::shutting_down) {
    // Asked again without grace (a second cancel): skip the power button.
    if (!graceful && st.stage == shutdown_stage::powerdown)
      quit_stage(self);
    return;
  }
  auto why = caf::make_error(runner_errc::cancelled, "the VM attempt is shutting down");
  if (st.boot_reply)
    st.boot_reply->deliver(why);
  if (st.handoff_reply)
    st.handoff_reply->deliver(why);
  st.boot_reply.reset();
  st.handoff_reply.reset();
  st.held_failure.reset();
  // Once handed off, the executor is the supervisor's to cancel; before, a
  // readiness poll may still run.
  bool shell_handed_out = st.phase == phase::handed_off || st.phase == phase::lost;
  st.phase = phase::shutting_down;
  if (st.ssh && !shell_handed_out)
    self->send(st.ssh, cancel_atom::value);
  if (st.qemu_state != vm_attempt_state::qemu_status::running)
    return clean_up(self);
  if (graceful && st.qmp_connected && !st.vm_paused)
    return powerdown_stage(self);
  quit_stage(self);  // a paused guest never sees the power button
}

void stage_timeout(attempt_pointer self, uint64_t token) {
  auto& st = self->state;
  if (token != st.stage_token || st.phase != phase::shutting_down ||
      st.qemu_state != vm_attempt_state::qemu_status::running)
    return;
  switch (st.stage) {
    case shutdown_stage::powerdown:
      self->send(st.observer, notice_atom::value,
                 std::string{"the guest did not power off in time; quitting QEMU"});
      return quit_stage(self);
    case shutdown_stage::quit:
      self->send(st.observer, notice_atom::value, std::string{"QEMU did not quit in time; killing it"});
      return kill_stage(self);
    case shutdown_stage::kill:
      st.shutdown_problem = "QEMU did not exit after SIGKILL";
      return clean_up(self);
    case shutdown_stage::cleanup:
      return;
  }
}

// ------------------------------------------------------------------ what the children say

void qemu_exited(attempt_pointer self, const v1::ProcessExit& exit) {
  auto& st = self->state;
  st.qemu_state = vm_attempt_state::qemu_status::exited;
  st.qemu_exit = exit;
  if (st.phase == phase::shutting_down && st.stage != shutdown_stage::cleanup)
    st.ended_by = to_string(st.stage);
  if (booting(st.phase))
    return fail_boot(self, qemu_exit_text(exit), true);
  if (vm_in_use(st.phase))
    return vm_lost(self, qemu_exit_text(exit));
  if (st.phase == phase::shutting_down && st.stage != shutdown_stage::cleanup)
    return clean_up(self);
}

void qmp_event(attempt_pointer self, const v1::QmpEvent& event) {
  auto& st = self->state;
  const auto& name = event.name();
  if (name == "STOP")
    st.vm_paused = true;
  else if (name == "RESUME")
    st.vm_paused = false;
  if (st.phase == phase::failed || st.phase == phase::ended)
    return;
  auto tell = [&] {
    self->send(st.observer, notice_atom::value, "QMP event " + name + " " + event.data_json());
  };
  if (name == "GUEST_PANICKED" || name == "RESET") {
    tell();
    auto what = name == "RESET" ? std::string{"the guest reset itself"}
                                : std::string{"the guest kernel panicked"};
    if (booting(st.phase))
      return boot_problem(self, what);
    if (vm_in_use(st.phase))
      return vm_lost(self, what);
  } else if (name == "STOP" && booting(st.phase) && st.phase != phase::restoring) {
    // Nothing here pauses the VM: QEMU stops it on an internal (KVM) error.
    fail_boot(self,
              uses_kvm(st) ? "the VM stopped during boot, as QEMU does on a KVM internal error"
                           : "the VM stopped during boot (" + st.vm.accel() +
                               "): QEMU pauses a guest it cannot run",
              true);
  } else if (name == "SHUTDOWN" || name == "POWERDOWN" || name == "STOP") {
    tell();
  }
}

// QEMU closed QMP: the VM can no longer be controlled. Usually QEMU is exiting
// (its socket closes before the process is gone, so /proc cannot tell yet), and
// its exit report, which names the cause, comes within the grace; otherwise
// something cut the socket and the boot fails or the VM is lost.
void qmp_closed(attempt_pointer self, const std::string& why) {
  auto& st = self->state;
  st.qmp_connected = false;
  if (booting(st.phase))
    return boot_problem(self, why);
  if (!vm_in_use(st.phase) || st.held_failure)
    return;
  if (st.qemu_state != vm_attempt_state::qemu_status::running)
    return vm_lost(self, why);
  st.held_failure = why;
  st.held_token = st.next_token++;
  self->delayed_send(self, st.timeouts.exit_report_grace, timeout_atom::value, st.held_token);
}

void child_down(attempt_pointer self, const caf::down_msg& down) {
  auto& st = self->state;
  if (down.source == st.tailer.address()) {
    st.tailer_gone = true;
    if (st.phase == phase::handing_off)
      release_executor(self);
    return;
  }
  if (st.phase == phase::shutting_down || st.phase == phase::ended)
    return;
  std::string who = down.source == st.qemu.address()  ? "qemu_process"
                    : down.source == st.qmp.address() ? "qmp_session"
                    : down.source == st.ssh.address() ? "ssh_executor"
                                                      : "a child actor";
  auto message = who + " stopped unexpectedly: " + caf::to_string(down.reason);
  if (down.source == st.qmp.address())
    st.qmp_connected = false;
  if (booting(st.phase))
    return boot_problem(self, message);
  if (vm_in_use(st.phase) && down.source != st.qmp.address())
    return vm_lost(self, message);
}

}  // namespace attempt

using namespace attempt;

const char* to_string(attempt_phase p) {
  switch (p) {
    case phase::idle: return "idle";
    case phase::preparing: return "preparing";
    case phase::launching: return "launching";
    case phase::connecting_qmp: return "connecting_qmp";
    case phase::reading_port: return "reading_port";
    case phase::restoring: return "restoring";
    case phase::identifying: return "identifying";
    case phase::waiting_for_ssh: return "waiting_for_ssh";
    case phase::booted: return "booted";
    case phase::handing_off: return "handing_off";
    case phase::handed_off: return "handed_off";
    case phase::failed: return "failed";
    case phase::lost: return "lost";
    case phase::shutting_down: return "shutting_down";
    case phase::ended: return "ended";
  }
  return "?";
}

vm_child_factory real_vm_children() {
  vm_child_factory f;
  f.qemu = [](caf::actor_system& sys, qemu_observer_actor observer) -> qemu_process_actor {
    return sys.spawn<caf::detached>(qemu_process, std::move(observer));
  };
  f.qmp = [](caf::actor_system& sys, qmp_observer_actor observer) -> qmp_session_actor {
    return sys.spawn<caf::detached>(qmp_session, std::move(observer));
  };
  f.console = [](caf::actor_system& sys, console_observer_actor observer,
                 console_capture capture) -> console_tailer_actor {
    return sys.spawn<caf::detached>(console_tailer, std::move(observer), std::move(capture),
                                    console_wakeup::inotify);
  };
  f.ssh = [](caf::actor_system& sys, output_observer_actor observer) -> ssh_executor_actor {
    return sys.spawn(ssh_executor, std::move(observer));
  };
  f.templates = [](caf::actor_system& sys) -> template_keeper_actor {
    return sys.spawn<caf::detached>(template_keeper);
  };
  return f;
}

vm_attempt_internal::behavior_type
vm_attempt(attempt_pointer self, vm_attempt_spec spec, vm_child_factory factory,
           vm_attempt_timeouts timeouts, attempt_observer_actor observer,
           output_observer_actor output_observer, std::shared_ptr<void> keep_alive) {
  auto& st = self->state;
  st.spec = std::move(spec);
  st.factory = std::move(factory);
  st.timeouts = timeouts;
  st.observer = std::move(observer);
  st.output_observer = std::move(output_observer);
  st.keep_alive = std::move(keep_alive);
  self->set_down_handler([=](caf::down_msg& down) { child_down(self, down); });
  // Nothing of an attempt outlives it: its children end with it.
  self->attach_functor([children = st.children](const caf::error&) {
    for (auto& child : *children)
      caf::anon_send_exit(child, caf::exit_reason::user_shutdown);
  });
  return {
    [=](boot_atom) -> caf::result<v1::VmHandle> {
      auto& st = self->state;
      if (st.phase != phase::idle)
        return caf::make_error(runner_errc::qemu_failed, "boot asked twice of one attempt");
      st.boot_reply = self->make_response_promise<v1::VmHandle>();
      auto reply = *st.boot_reply;
      prepare(self);
      return reply;
    },
    [=](handoff_atom) -> caf::result<guest_shell_actor> {
      auto& st = self->state;
      if (st.phase != phase::booted)
        return caf::make_error(runner_errc::qemu_failed,
                               std::string{"console hand-off asked in phase "} +
                                 to_string(st.phase));
      st.handoff_reply = self->make_response_promise<guest_shell_actor>();
      auto reply = *st.handoff_reply;
      hand_off(self);
      return reply;
    },
    [=](shutdown_atom, bool graceful) -> caf::result<std::string> {
      auto reply = self->make_response_promise<std::string>();
      self->state.shutdown_replies.push_back(reply);
      shut_down(self, graceful);
      return reply;
    },
    [=](exited_atom, const v1::ProcessExit& exit) { qemu_exited(self, exit); },
    [=](qmp_event_atom, const v1::QmpEvent& event) { qmp_event(self, event); },
    [=](qmp_closed_atom, const std::string& why) { qmp_closed(self, why); },
    [=](console_atom, std::string& line) {
      auto& st = self->state;
      if (st.phase == phase::failed || st.phase == phase::ended)
        return unexpected(self, "console line");
      st.console_tail.push_back(line);
      if (st.console_tail.size() > console_tail_lines)
        st.console_tail.pop_front();
      self->send(st.observer, console_atom::value, std::move(line));
    },
    [=](timeout_atom, uint64_t token) {
      auto& st = self->state;
      if (token == st.held_token && st.held_failure && booting(st.phase))
        return fail_boot(self, *st.held_failure, false);
      if (token == st.held_token && st.held_failure && vm_in_use(st.phase))
        return vm_lost(self, *st.held_failure);
      if (token == st.restore_token && st.phase == phase::restoring)
        return poll_restore(self);
      stage_timeout(self, token);
    },
  };
}

}  // namespace solstice
