#include "actors/job_supervisor.hpp"

#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include <caf/actor_system.hpp>
#include <caf/spawn_options.hpp>
#include <caf/system_messages.hpp>
#include <caf/exit_reason.hpp>
#include <caf/send.hpp>
#include <caf/stateful_actor.hpp>
#include <nlohmann/json.hpp>

#include "actors/console_tailer.hpp"
#include "actors/qemu_process.hpp"
#include "actors/qmp_session.hpp"
#include "actors/runner_types.hpp"
#include "actors/ssh_executor.hpp"
#include "runtime/guest_commands.hpp"
#include "runtime/qmp.hpp"
#include "runtime/ssh_keys.hpp"
#include "runtime/vm_prepare.hpp"

namespace solstice {

ReturnFreedMemory::~ReturnFreedMemory() { ::malloc_trim(0); }

namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::seconds;
using supervisor_pointer = job_supervisor_actor::stateful_pointer<job_supervisor_state>;

constexpr uint64_t job_deadline_token = 1;
// The job deadline is checked at least this often.
constexpr std::chrono::seconds deadline_check{10};
constexpr uint32_t setup_step = runner_setup_step;

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
           std::chrono::system_clock::now().time_since_epoch())
    .count();
}

vm_observer_actor observer_of(supervisor_pointer self) {
  return caf::actor_cast<vm_observer_actor>(self);
}

// ------------------------------------------------------------------ events

void emit(supervisor_pointer self, v1::JobEvent event) {
  auto& st = self->state;
  event.set_job_id(st.job.id());
  event.set_sequence(st.event_sequence++);
  event.set_timestamp_us(now_us());
  for (auto& sink : st.sinks)
    self->send(sink, event_atom::value, event);
}

std::string redact_text(const job_supervisor_state& st, const std::string& text) {
  return st.secrets.empty() ? text : redact(text, st.secrets);
}

void set_state(supervisor_pointer self, v1::JobState state, std::string detail = {}) {
  self->state.state = state;
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

// The job's actors are stopped with the supervisor, and each holds the job's
// memory trim, which runs when the last of them (threads included) is gone.
void adopt(supervisor_pointer self, caf::actor child) {
  auto& st = self->state;
  caf::actor_cast<caf::abstract_actor*>(child)->attach_functor(
    [trim = st.memory_trim](const caf::error&) {});
  st.children->push_back(std::move(child));
}

void begin_phase(supervisor_pointer self, const std::string& phase) {
  self->state.phase_started[phase] = std::chrono::steady_clock::now();
}

void end_phase(supervisor_pointer self, const std::string& phase) {
  auto& st = self->state;
  auto i = st.phase_started.find(phase);
  if (i == st.phase_started.end())
    return;
  auto* timing = st.result.add_phases();
  timing->set_phase(phase);
  timing->set_duration_ms(std::chrono::duration_cast<milliseconds>(
                            std::chrono::steady_clock::now() - i->second)
                            .count());
  st.phase_started.erase(i);
}

std::string console_tail_text(const job_supervisor_state& st) {
  std::string out;
  for (const auto& line : st.console_tail)
    out += "\n  | " + line;
  return out;
}

// ------------------------------------------------------------------ the end

void begin_shutdown(supervisor_pointer self);

// Decides the job's outcome (the first decision wins) and moves to shutdown.
void finish_job(supervisor_pointer self, v1::JobStatus status, const std::string& message) {
  auto& st = self->state;
  if (st.finishing)
    return;
  st.finishing = true;
  st.status = status;
  if (!message.empty()) {
    st.error = redact_text(st, message);
    v1::JobEvent event;
    event.mutable_error()->set_message(st.error);
    emit(self, std::move(event));
  }
  if (st.ssh)
    self->send(st.ssh, cancel_atom::value);
  begin_shutdown(self);
}

void decide_infrastructure_error(supervisor_pointer self, const std::string& message) {
  auto& st = self->state;
  auto text = message;
  if (!st.console_tail.empty())
    text += "\nlast console lines:" + console_tail_text(st);
  finish_job(self, v1::INFRASTRUCTURE_ERROR, text);
}

// While QEMU may still be running, a failure is held back for a moment: if QEMU's
// exit report comes meanwhile, the job's error names that real cause instead.
void infrastructure_error(supervisor_pointer self, const std::string& message) {
  auto& st = self->state;
  if (st.finishing || !st.held_error.empty())
    return;
  if (!st.launched || st.qemu_exited) {
    decide_infrastructure_error(self, message);
    return;
  }
  st.held_error = message;
  st.held_error_token = st.next_token++;
  self->delayed_send(self, exit_report_grace, timeout_atom::value, st.held_error_token);
}

int job_exit_code(const job_supervisor_state& st) {
  switch (st.status.value_or(v1::INFRASTRUCTURE_ERROR)) {
    case v1::SUCCEEDED: return 0;
    case v1::FAILED:
      for (const auto& step : st.result.steps())
        if (step.outcome() == v1::STEP_FAILED)
          return step.exit_code() != 0 ? step.exit_code() : 1;
      return 1;
    case v1::TIMED_OUT: return 124;
    case v1::CANCELLED: return 130;
    default: return 125;
  }
}

std::string summary_of(const job_supervisor_state& st) {
  std::string status = v1::JobStatus_Name(st.status.value_or(v1::INFRASTRUCTURE_ERROR));
  for (auto& c : status)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  int ran = 0, failed = 0, skipped = 0;
  for (const auto& step : st.result.steps()) {
    if (step.outcome() == v1::STEP_SKIPPED)
      ++skipped;
    else
      ++ran;
    if (step.outcome() == v1::STEP_FAILED || step.outcome() == v1::STEP_TIMED_OUT)
      ++failed;
  }
  auto text = "job " + st.job.id() + " " + status + ": " + std::to_string(ran) + " of " +
              std::to_string(st.job.steps_size()) + " steps ran";
  if (failed)
    text += ", " + std::to_string(failed) + " failed";
  if (skipped)
    text += ", " + std::to_string(skipped) + " skipped";
  if (!st.error.empty())
    text += " — " + st.error.substr(0, st.error.find('\n'));
  return text;
}

void step_finished(supervisor_pointer self, unsigned index, v1::StepResult result);

void finish(supervisor_pointer self) {
  auto& st = self->state;
  if (st.cleaned_up)
    return;
  st.cleaned_up = true;
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
  // Steps never reached are reported as skipped.
  for (int i = st.result.steps_size(); i < st.job.steps_size(); ++i) {
    auto* step = st.result.add_steps();
    step->set_step_index(static_cast<uint32_t>(i));
    step->set_name(st.job.steps(i).name());
    step->set_outcome(v1::STEP_SKIPPED);
  }
  st.slot.reset();  // the VM is gone: its slot is free
  set_state(self, v1::CLEANED_UP);
  auto& r = st.result;
  r.set_job_id(st.job.id());
  r.set_status(st.status.value_or(v1::INFRASTRUCTURE_ERROR));
  r.set_exit_code(job_exit_code(st));
  for (const auto& step : r.steps())
    if (step.outcome() == v1::STEP_FAILED && !step.exit_signal().empty()) {
      r.set_exit_signal(step.exit_signal());
      break;
    }
  r.set_error(st.error);
  if (r.shutdown_method().empty())
    r.set_shutdown_method(st.launched ? "exited" : "none");
  for (const auto& line : st.console_tail)
    r.add_console_tail(line);
  r.set_summary(summary_of(st));
  v1::JobEvent event;
  *event.mutable_result() = r;
  emit(self, std::move(event));
  self->quit();
}

void cleanup(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.qemu) {
    finish(self);
    return;
  }
  self->request(st.qemu, st.timeouts.kill_wait + seconds(30), cleanup_atom::value)
    .then([=](ok_atom) { finish(self); },
          [=](caf::error& err) {
            auto& st = self->state;
            if (st.error.empty())
              st.error = "cleanup failed: " + error_text(err);
            finish(self);
          });
}

// Waits for QEMU's exit at this shutdown stage; the deadline moves to the next.
void await_exit(supervisor_pointer self, const std::string& stage, milliseconds wait) {
  auto& st = self->state;
  st.shutdown_stage = stage;
  st.shutdown_token = st.next_token++;
  self->delayed_send(self, wait, timeout_atom::value, st.shutdown_token);
}

void kill_stage(supervisor_pointer self) {
  auto& st = self->state;
  self->send(st.qemu, kill_atom::value);
  await_exit(self, "kill", st.timeouts.kill_wait);
}

void quit_stage(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.qmp_connected) {
    kill_stage(self);
    return;
  }
  st.shutdown_stage = "quit";
  self->request(st.qmp, seconds(15), command_atom::value, std::string{"quit"}, std::string{"{}"})
    .then([=](const std::string&) { await_exit(self, "quit", self->state.timeouts.quit_wait); },
          [=](caf::error&) {
            // QEMU closes the socket as it quits: a lost reply is normal here.
            await_exit(self, "quit", self->state.timeouts.quit_wait);
          });
}

void powerdown_stage(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.qmp_connected) {
    kill_stage(self);
    return;
  }
  st.shutdown_stage = "powerdown";
  auto wait = milliseconds(
    std::max<uint32_t>(st.config.powerdown_timeout_seconds(), 1) * 1000);
  // A guest that never got as far as SSH is unlikely to handle the power button:
  // give it a short chance, not the full timeout.
  if (!st.ssh_ready)
    wait = std::min(wait, milliseconds(3000));
  self->request(st.qmp, seconds(15), command_atom::value, std::string{"system_powerdown"},
                std::string{"{}"})
    .then([=](const std::string&) { await_exit(self, "powerdown", wait); },
          [=](caf::error&) { quit_stage(self); });
}

void shut_down_vm(supervisor_pointer self) {
  auto& st = self->state;
  set_state(self, v1::SHUTTING_DOWN);
  begin_phase(self, "shutdown");
  if (!st.launched || st.qemu_exited) {
    cleanup(self);
    return;
  }
  if (st.vm_paused) {
    quit_stage(self);  // a paused guest never sees the power button
    return;
  }
  powerdown_stage(self);
}

// debug-on-failure: keep the failed VM up and say how to get in.
bool hold_for_debugging(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.job.debug_on_failure().enabled() || st.status == v1::SUCCEEDED ||
      st.status == v1::CANCELLED || !st.launched || st.qemu_exited || st.vm.ssh_port() == 0)
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
  st.debug_token = st.next_token++;
  self->delayed_send(self, seconds(keep), timeout_atom::value, st.debug_token);
  return true;
}

void begin_shutdown(supervisor_pointer self) {
  auto& st = self->state;
  if (st.shutdown_started)
    return;
  st.shutdown_started = true;
  if (hold_for_debugging(self))
    return;
  shut_down_vm(self);
}

// ------------------------------------------------------------------ steps

void collect_artifacts(supervisor_pointer self, int index);
void run_step(supervisor_pointer self, unsigned index);

void succeed_or_fail_after_steps(supervisor_pointer self) {
  auto& st = self->state;
  if (!st.status)
    st.status = v1::SUCCEEDED;
  collect_artifacts(self, 0);
}

std::string artifact_local_name(const v1::Artifact& artifact) {
  if (!artifact.destination().empty())
    return artifact.destination();
  return fs::path(artifact.path()).filename().string();
}

void collect_artifacts(supervisor_pointer self, int index) {
  auto& st = self->state;
  if (st.finishing)
    return;
  if (index == 0) {
    if (st.job.artifacts_size() == 0) {
      finish_job(self, *st.status, "");
      return;
    }
    set_state(self, v1::COLLECTING_ARTIFACTS);
    begin_phase(self, "artifacts");
    (void)make_private_dir(fs::path(st.vm.job_dir()) / "artifacts");
  }
  if (index >= st.job.artifacts_size()) {
    end_phase(self, "artifacts");
    // Steps decided the status; a missing artifact may have turned it to failed.
    finish_job(self, *st.status, "");
    return;
  }
  const auto& artifact = st.job.artifacts(index);
  auto local = fs::path(st.vm.job_dir()) / "artifacts" / artifact_local_name(artifact);
  self->request(st.ssh, st.timeouts.transfer, download_atom::value, artifact.path(),
                local.string())
    .then(
      [=](ok_atom) {
        self->state.result.add_artifacts(local.string());
        collect_artifacts(self, index + 1);
      },
      [=](caf::error& err) {
        auto& st = self->state;
        if (st.finishing)
          return;
        const auto& artifact = st.job.artifacts(index);
        auto message = "artifact " + artifact.path() + ": " + error_text(err);
        if (artifact.optional()) {
          notice(self, message + " (optional, skipped)");
        } else {
          v1::JobEvent event;
          event.mutable_error()->set_message(redact_text(st, message));
          emit(self, std::move(event));
          if (st.status == v1::SUCCEEDED)
            st.status = v1::FAILED;
          if (st.error.empty())
            st.error = redact_text(st, message);
        }
        collect_artifacts(self, index + 1);
      });
}

void flush_step_output(supervisor_pointer self, unsigned index) {
  auto& st = self->state;
  auto flush = [&](std::optional<Redactor>& redactor, v1::OutputStream stream,
                   uint64_t& sequence) {
    if (!redactor)
      return;
    auto rest = redactor->flush();
    if (rest.empty())
      return;
    v1::JobEvent event;
    auto* chunk = event.mutable_output();
    chunk->set_step_index(index);
    chunk->set_stream(stream);
    chunk->set_sequence(sequence++);
    chunk->set_data(std::move(rest));
    emit(self, std::move(event));
  };
  flush(st.stdout_redactor, v1::STDOUT, st.stdout_sequence);
  flush(st.stderr_redactor, v1::STDERR, st.stderr_sequence);
}

void step_finished(supervisor_pointer self, unsigned index, v1::StepResult result) {
  auto& st = self->state;
  const auto& step = st.job.steps(static_cast<int>(index));
  flush_step_output(self, index);
  st.running_step.reset();
  end_phase(self, "step:" + step.name());
  result.set_step_index(index);
  result.set_name(step.name());
  if (result.outcome() == v1::STEP_FAILED && step.allow_failure())
    result.set_outcome(v1::STEP_ALLOWED_FAILURE);
  *st.result.add_steps() = result;
  v1::JobEvent event;
  *event.mutable_step_finished() = result;
  emit(self, std::move(event));
  if (st.finishing)
    return;
  switch (result.outcome()) {
    case v1::STEP_FAILED: {
      auto why = "step '" + step.name() + "' failed with " +
                 (result.exit_signal().empty()
                    ? "exit code " + std::to_string(result.exit_code())
                    : "signal " + result.exit_signal() + " (exit code " +
                        std::to_string(result.exit_code()) + ")");
      st.status = v1::FAILED;
      st.error = redact_text(st, why);
      collect_artifacts(self, 0);
      return;
    }
    case v1::STEP_TIMED_OUT:
      if (!step.allow_failure()) {
        finish_job(self, v1::TIMED_OUT,
                   "step '" + step.name() + "' timed out after " +
                     std::to_string(step.timeout_seconds()) + " s");
        return;
      }
      break;
    case v1::STEP_CANCELLED:
      return;  // whoever cancelled has decided already
    default:
      break;
  }
  if (index + 1 < static_cast<unsigned>(st.job.steps_size()))
    run_step(self, index + 1);
  else
    succeed_or_fail_after_steps(self);
}

void exec_step(supervisor_pointer self, unsigned index) {
  auto& st = self->state;
  const auto& step = st.job.steps(static_cast<int>(index));
  st.running_step = index;
  st.stdout_redactor.emplace(st.secrets);
  st.stderr_redactor.emplace(st.secrets);
  st.stdout_sequence = st.stderr_sequence = 0;
  v1::JobEvent event;
  event.mutable_step_started()->set_step_index(index);
  event.mutable_step_started()->set_name(step.name());
  emit(self, std::move(event));
  begin_phase(self, "step:" + step.name());
  auto step_timeout = milliseconds(uint64_t{step.timeout_seconds()} * 1000);
  // The reply deadline is the job's; the step timeout is enforced by the executor
  // so it can report timed_out with the output so far.
  auto reply_deadline = milliseconds(uint64_t{st.job.timeout_seconds()} * 1000 + 60000);
  // One round trip: the command writes the script from its stdin, then runs it.
  self->request(st.ssh, reply_deadline, exec_atom::value, index, step_command(index),
                make_step_script(step.script()), static_cast<uint32_t>(step_timeout.count()))
    .then([=](v1::StepResult& result) { step_finished(self, index, std::move(result)); },
          [=](caf::error& err) {
            auto& st = self->state;
            if (st.finishing) {
              v1::StepResult result;
              result.set_outcome(v1::STEP_CANCELLED);
              step_finished(self, index, std::move(result));
              return;
            }
            infrastructure_error(self, "step '" + st.job.steps(static_cast<int>(index)).name() +
                                         "' could not run: " + error_text(err));
          });
}

void run_step(supervisor_pointer self, unsigned index) {
  if (self->state.finishing)
    return;
  exec_step(self, index);
}

void upload_files(supervisor_pointer self, int index) {
  auto& st = self->state;
  if (st.finishing)
    return;
  if (index >= st.job.uploads_size()) {
    if (st.job.steps_size() == 0)
      succeed_or_fail_after_steps(self);
    else
      run_step(self, 0);
    return;
  }
  const auto& upload = st.job.uploads(index);
  self->request(st.ssh, st.timeouts.transfer, put_file_atom::value, upload.source(),
                upload.destination(), upload.mode() ? upload.mode() : 0644u)
    .then([=](ok_atom) { upload_files(self, index + 1); },
          [=](caf::error& err) {
            const auto& upload = self->state.job.uploads(index);
            finish_job(self, v1::FAILED,
                       "upload " + upload.source() + " -> " + upload.destination() + ": " +
                         error_text(err));
          });
}

// The first thing that reaches the SSH executor after the console hand-off.
void start_running(supervisor_pointer self) {
  auto& st = self->state;
  if (st.finishing || st.state == v1::RUNNING)
    return;
  end_phase(self, "console_handoff");
  set_state(self, v1::RUNNING);
  // One round trip: directories for the job's files and for every upload
  // destination, and the environment file, written from the command's stdin
  // (secrets never appear in a command line).
  std::vector<std::string> dirs;
  for (const auto& upload : st.job.uploads())
    dirs.push_back(fs::path(upload.destination()).parent_path().string());
  std::map<std::string, std::string> env(st.job.env().begin(), st.job.env().end());
  env["SOLSTICE_JOB_ID"] = st.job.id();
  std::map<std::string, std::string> secrets(st.job.secrets().begin(), st.job.secrets().end());
  self->request(st.ssh, st.timeouts.transfer, exec_atom::value, setup_step, setup_command(dirs),
                make_env_file(env, secrets), uint32_t{60000})
    .then(
      [=](v1::StepResult& result) {
        auto& st = self->state;
        if (st.finishing)
          return;
        if (result.exit_code() != 0) {
          infrastructure_error(self, "cannot create the job's directories and " +
                                       env_file_path() + " in the guest (exit code " +
                                       std::to_string(result.exit_code()) + ")");
          return;
        }
        upload_files(self, 0);
      },
      [=](caf::error& err) {
        infrastructure_error(self, "cannot prepare the guest: " + error_text(err));
      });
}

// ------------------------------------------------------------------ boot

// SSH is ready: the console tailer must confirm it stopped (or be killed and gone)
// before anything is executed, or guest output would be logged twice.
void console_handoff(supervisor_pointer self) {
  auto& st = self->state;
  set_state(self, v1::CONSOLE_HANDOFF);
  begin_phase(self, "console_handoff");
  self->request(st.tailer, st.timeouts.console_stop, stop_atom::value)
    .then(
      [=](stopped_atom) {
        self->state.tailer_stopped = true;
        start_running(self);
      },
      [=](caf::error& err) {
        auto& st = self->state;
        if (st.finishing)
          return;
        if (st.tailer_stopped) {  // it is gone already: nothing can log twice
          start_running(self);
          return;
        }
        notice(self, "console tailer did not stop (" + error_text(err) + "); killing it");
        st.waiting_for_tailer_down = true;
        self->send_exit(st.tailer, caf::exit_reason::kill);
      });
}

void wait_for_ssh(supervisor_pointer self) {
  auto& st = self->state;
  set_state(self, v1::WAITING_FOR_SSH, "127.0.0.1:" + std::to_string(st.vm.ssh_port()));
  st.ssh = st.factory.ssh(self->system(), observer_of(self));
  self->monitor(st.ssh);
  adopt(self, caf::actor_cast<caf::actor>(st.ssh));
  auto boot_timeout = milliseconds(
    uint64_t{st.config.boot_timeout_seconds() ? st.config.boot_timeout_seconds() : 300} * 1000);
  auto attempt = st.boot_attempt;
  self->request(st.ssh, boot_timeout + seconds(30), ready_atom::value, st.vm,
                static_cast<uint32_t>(boot_timeout.count()))
    .then(
      [=](ok_atom) {
        if (self->state.finishing || self->state.boot_attempt != attempt)
          return;
        self->state.ssh_ready = true;
        end_phase(self, "boot_to_ssh");
        console_handoff(self);
      },
      [=](caf::error& err) {
        if (self->state.finishing || self->state.boot_attempt != attempt)
          return;
        infrastructure_error(self, "SSH did not become ready: " + error_text(err));
      });
}

void read_ssh_port(supervisor_pointer self) {
  auto& st = self->state;
  nlohmann::json args = {{"command-line", "info usernet"}};
  auto attempt = st.boot_attempt;
  self->request(st.qmp, seconds(15), command_atom::value, std::string{"human-monitor-command"},
                args.dump())
    .then(
      [=](const std::string& reply) {
        auto& st = self->state;
        if (st.finishing || st.boot_attempt != attempt)
          return;
        auto text = nlohmann::json::parse(reply, nullptr, false);
        auto port = parse_usernet_host_port(text.is_string() ? text.get<std::string>() : reply);
        if (!port) {
          infrastructure_error(self, "cannot learn the SSH port: " + port.error().message);
          return;
        }
        st.vm.set_ssh_port(*port);
        wait_for_ssh(self);
      },
      [=](caf::error& err) {
        if (self->state.boot_attempt != attempt)
          return;
        infrastructure_error(self, "cannot learn the SSH port: " + error_text(err));
      });
}

void boot(supervisor_pointer self) {
  auto& st = self->state;
  set_state(self, v1::BOOTING, st.vm.accel() + ", " + std::to_string(st.vm.vcpus()) +
                                 " vcpus, " + std::to_string(st.vm.memory_mib()) + " MiB");
  begin_phase(self, "boot_to_ssh");
  st.tailer = st.factory.console(self->system(), observer_of(self), st.vm.console_log());
  self->monitor(st.tailer);
  adopt(self, caf::actor_cast<caf::actor>(st.tailer));
  auto attempt = st.boot_attempt;
  self->request(st.qemu, seconds(30), launch_atom::value)
    .then(
      [=](v1::VmHandle& handle) {
        auto& st = self->state;
        if (st.boot_attempt != attempt)
          return;
        st.launched = true;
        handle.set_ssh_port(st.vm.ssh_port());
        st.vm = std::move(handle);
        if (st.finishing)
          return;  // finish_job's shutdown is already under way
        st.qmp = st.factory.qmp(self->system(), observer_of(self));
        self->monitor(st.qmp);
  adopt(self, caf::actor_cast<caf::actor>(st.qmp));
        self->request(st.qmp, st.timeouts.qmp_connect + seconds(5), connect_atom::value,
                      st.vm.qmp_socket(), static_cast<uint32_t>(st.timeouts.qmp_connect.count()))
          .then(
            [=](ok_atom) {
              if (self->state.boot_attempt != attempt)
                return;
              self->state.qmp_connected = true;
              if (!self->state.finishing)
                read_ssh_port(self);
            },
            [=](caf::error& err) {
              if (self->state.boot_attempt == attempt)
                infrastructure_error(self, error_text(err));
            });
      },
      [=](caf::error& err) {
        if (self->state.boot_attempt == attempt)
          infrastructure_error(self, error_text(err));
      });
}

void prepare(supervisor_pointer self) {
  auto& st = self->state;
  set_state(self, v1::PREPARING);
  begin_phase(self, "prepare");
  st.qemu = st.factory.qemu(self->system(), observer_of(self));
  self->monitor(st.qemu);
  adopt(self, caf::actor_cast<caf::actor>(st.qemu));
  self->request(st.qemu, st.timeouts.prepare, prepare_atom::value, st.job, st.image, st.config)
    .then(
      [=](v1::VmHandle& handle) {
        auto& st = self->state;
        st.vm = std::move(handle);
        end_phase(self, "prepare");
        if (st.finishing)
          return;  // finish_job's shutdown is already under way
        boot(self);
      },
      [=](caf::error& err) { infrastructure_error(self, error_text(err)); });
}

// "auto" picked KVM, and KVM could not boot this guest (on some hosts /dev/kvm
// exists but fails: QEMU stops with a KVM internal error or exits). Retire this
// attempt's actors and VM files and boot again on TCG.
bool kvm_chosen_automatically(const job_supervisor_state& st) {
  return st.vm.accel() == "kvm" && !st.kvm_fallback &&
         (st.config.accel().empty() || st.config.accel() == "auto");
}

bool before_ssh_ready(const job_supervisor_state& st) {
  return st.state == v1::BOOTING || st.state == v1::WAITING_FOR_SSH;
}

void retire(supervisor_pointer self, const caf::actor& child) {
  if (!child)
    return;
  self->demonitor(child.address());
  self->send_exit(child, caf::exit_reason::user_shutdown);
}

void fall_back_to_tcg(supervisor_pointer self, const std::string& reason) {
  auto& st = self->state;
  // The KVM attempt's phases keep their time under their own names, so the
  // result lists each phase once: kvm:prepare, kvm:boot, then the TCG phases.
  end_phase(self, "boot_to_ssh");
  for (auto& phase : *st.result.mutable_phases()) {
    if (phase.phase() == "boot_to_ssh")
      phase.set_phase("boot");
    phase.set_phase("kvm:" + phase.phase());
  }
  st.kvm_fallback = true;
  st.restarting = true;
  st.launched = false;
  ++st.boot_attempt;
  notice(self, "KVM cannot run this guest (" + reason + "); falling back to TCG, which is slower");
  st.config.set_accel("tcg");
  if (st.ssh)
    self->send(st.ssh, cancel_atom::value);
  retire(self, caf::actor_cast<caf::actor>(st.ssh));
  retire(self, caf::actor_cast<caf::actor>(st.qmp));
  retire(self, caf::actor_cast<caf::actor>(st.tailer));
  st.ssh = nullptr;
  st.qmp = nullptr;
  st.tailer = nullptr;
  st.qmp_connected = false;
  self->request(st.qemu, st.timeouts.kill_wait + seconds(30), cleanup_atom::value)
    .then(
      [=](ok_atom) {
        auto& st = self->state;
        retire(self, caf::actor_cast<caf::actor>(st.qemu));
        st.qemu = nullptr;
        st.qemu_exited = false;
        st.vm_paused = false;  // the KVM attempt's STOP says nothing about the TCG VM
        st.restarting = false;
        if (st.finishing)
          finish(self);
        else
          prepare(self);
      },
      [=](caf::error& err) {
        self->state.restarting = false;
        infrastructure_error(self, "cannot clean up after the failed KVM boot: " +
                                     error_text(err));
      });
}

// Waits (polling, never blocking) for one of the host's VM slots.
void acquire_slot(supervisor_pointer self) {
  auto& st = self->state;
  if (st.finishing)
    return;
  auto max = st.config.max_concurrent_vms();
  if (max == 0) {
    prepare(self);
    return;
  }
  auto slot = VmSlot::try_acquire(st.config.state_dir(), max);
  if (!slot) {
    infrastructure_error(self, slot.error().message);
    return;
  }
  if (slot->has_value()) {
    st.slot = std::move(*slot);
    prepare(self);
    return;
  }
  if (!st.said_waiting) {
    st.said_waiting = true;
    notice(self, "waiting in the queue: all " + std::to_string(max) +
                   " VM slots of this host are in use (max_concurrent_vms)");
  }
  st.slot_token = st.next_token++;
  self->delayed_send(self, milliseconds(250), timeout_atom::value, st.slot_token);
}

// ------------------------------------------------------------------ observer

void on_qemu_exit(supervisor_pointer self, const v1::ProcessExit& exit) {
  auto& st = self->state;
  if (st.restarting)
    return;  // the retired KVM attempt's QEMU
  st.qemu_exited = true;
  st.qemu_exit = exit;
  if (st.shutdown_started && !st.shutdown_stage.empty()) {
    st.result.set_shutdown_method(st.shutdown_stage);
    cleanup(self);
    return;
  }
  auto message = "QEMU exited unexpectedly (" + exit.description() + ")";
  auto stderr_text = exit.stderr_tail();
  while (!stderr_text.empty() && (stderr_text.back() == '\n' || stderr_text.back() == ' '))
    stderr_text.pop_back();
  if (!stderr_text.empty())
    message += ": " + stderr_text;
  if (kvm_chosen_automatically(st) && before_ssh_ready(st) && !st.shutdown_started) {
    fall_back_to_tcg(self, message);
    return;
  }
  st.result.set_shutdown_method("exited");
  if (st.shutdown_started) {
    // Held for debugging, or shutting down before the VM was up.
    cleanup(self);
    return;
  }
  st.held_error.clear();
  decide_infrastructure_error(self, message);
}

void on_qmp_event(supervisor_pointer self, const v1::QmpEvent& event) {
  auto& st = self->state;
  const auto& name = event.name();
  if (name == "STOP")
    st.vm_paused = true;
  else if (name == "RESUME")
    st.vm_paused = false;
  if (name == "GUEST_PANICKED") {
    notice(self, "QMP event GUEST_PANICKED " + event.data_json());
    if (!st.shutdown_started)
      infrastructure_error(self, "the guest kernel panicked");
  } else if (name == "RESET") {
    notice(self, "QMP event RESET " + event.data_json());
    if (!st.shutdown_started)
      infrastructure_error(self, "the guest reset itself");
  } else if (name == "STOP" && kvm_chosen_automatically(st) && before_ssh_ready(st) &&
             !st.shutdown_started && !st.restarting) {
    fall_back_to_tcg(self, "the VM stopped during boot, as QEMU does on a KVM internal error");
  } else if (name == "STOP" && before_ssh_ready(st) && !st.shutdown_started &&
             !st.restarting) {
    // Nothing here pauses the VM: QEMU stops it on an internal (KVM) error.
    infrastructure_error(self, "the VM stopped during boot (" + st.vm.accel() +
                                 "): QEMU pauses a guest it cannot run" +
                                 (st.vm.accel() == "kvm"
                                    ? std::string{" — this host's KVM cannot run it; use "
                                                  "--accel tcg or auto"}
                                    : std::string{}));
  } else if (name == "SHUTDOWN" || name == "POWERDOWN" || name == "STOP") {
    notice(self, "QMP event " + name + " " + event.data_json());
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

// Sink `index` has handled `bytes` more of the executor's output: credit the
// executor with what every sink has now handled (its worker waits when too much
// is in flight, so the slowest sink paces the step).
void output_handled(supervisor_pointer self, size_t index, uint64_t bytes) {
  auto& st = self->state;
  st.sink_handled_bytes[index] += bytes;
  auto all_handled = *std::min_element(st.sink_handled_bytes.begin(), st.sink_handled_bytes.end());
  if (all_handled > st.output_credited_bytes && st.ssh)
    self->send(st.ssh, ack_atom::value, all_handled - st.output_credited_bytes);
  st.output_credited_bytes = std::max(st.output_credited_bytes, all_handled);
}

// Output events go to the sinks as requests: the (empty) reply of a sink's
// handler is its acknowledgement. A sink that is gone answers with an error,
// which counts as handled: nothing is queued for it any more.
void emit_output(supervisor_pointer self, v1::JobEvent event, uint64_t chunk_bytes) {
  auto& st = self->state;
  event.set_job_id(st.job.id());
  event.set_sequence(st.event_sequence++);
  event.set_timestamp_us(now_us());
  for (size_t i = 0; i < st.sinks.size(); ++i)
    self->request(st.sinks[i], caf::infinite, event_atom::value, event)
      .then([=]() { output_handled(self, i, chunk_bytes); },
            [=](caf::error&) { output_handled(self, i, chunk_bytes); });
}

void on_output(supervisor_pointer self, const v1::OutputChunk& chunk) {
  auto& st = self->state;
  const uint64_t chunk_bytes = chunk.data().size();
  if (st.sink_handled_bytes.size() != st.sinks.size())
    st.sink_handled_bytes.assign(st.sinks.size(), st.output_credited_bytes);
  auto not_queued = [&] {
    for (size_t i = 0; i < st.sinks.size(); ++i)
      st.sink_handled_bytes[i] += chunk_bytes;
    if (st.ssh)
      self->send(st.ssh, ack_atom::value, chunk_bytes);
    st.output_credited_bytes += chunk_bytes;
  };
  if (chunk.step_index() == setup_step || !st.running_step ||
      chunk.step_index() != *st.running_step) {
    not_queued();
    return;
  }
  bool is_out = chunk.stream() == v1::STDOUT;
  auto& redactor = is_out ? st.stdout_redactor : st.stderr_redactor;
  auto data = redactor ? redactor->feed(chunk.data()) : chunk.data();
  if (data.empty() || st.sinks.empty()) {
    not_queued();
    return;
  }
  v1::JobEvent event;
  auto* out = event.mutable_output();
  out->set_step_index(chunk.step_index());
  out->set_stream(chunk.stream());
  out->set_sequence(is_out ? st.stdout_sequence++ : st.stderr_sequence++);
  out->set_data(std::move(data));
  emit_output(self, std::move(event), chunk_bytes);
}

void on_down(supervisor_pointer self, const caf::down_msg& down) {
  auto& st = self->state;
  if (down.source == st.tailer.address()) {
    st.tailer_stopped = true;
    if (st.waiting_for_tailer_down) {
      st.waiting_for_tailer_down = false;
      start_running(self);
    }
    return;
  }
  if (st.cleaned_up || st.finishing)
    return;
  std::string who = down.source == st.qemu.address()  ? "qemu_process"
                    : down.source == st.qmp.address() ? "qmp_session"
                    : down.source == st.ssh.address() ? "ssh_executor"
                                                      : "an actor";
  infrastructure_error(self, who + " stopped unexpectedly: " + caf::to_string(down.reason));
}

}  // namespace

vm_actor_factory detached_vm_actors() {
  vm_actor_factory f;
  f.qemu = [](caf::actor_system& sys, vm_observer_actor observer) {
    return sys.spawn<caf::detached>(qemu_process, std::move(observer));
  };
  f.qmp = [](caf::actor_system& sys, vm_observer_actor observer) {
    return sys.spawn<caf::detached>(qmp_session, std::move(observer));
  };
  f.console = [](caf::actor_system& sys, vm_observer_actor observer, std::string path) {
    return sys.spawn<caf::detached>(console_tailer, std::move(observer), std::move(path),
                                    console_wakeup::inotify);
  };
  f.ssh = [](caf::actor_system& sys, vm_observer_actor observer) {
    return sys.spawn(ssh_executor, std::move(observer));
  };
  return f;
}

job_supervisor_actor::behavior_type
job_supervisor(supervisor_pointer self, v1::JobSpec job, v1::ImageSpec image,
               v1::RunnerConfig config, std::vector<event_sink_actor> sinks,
               vm_actor_factory factory, supervisor_timeouts timeouts) {
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
  self->attach_functor([children = st.children, trim = st.memory_trim](const caf::error&) {
    for (auto& child : *children)
      caf::anon_send_exit(child, caf::exit_reason::user_shutdown);
  });
  return {
    [=](exited_atom, const v1::ProcessExit& exit) { on_qemu_exit(self, exit); },
    [=](qmp_event_atom, const v1::QmpEvent& event) { on_qmp_event(self, event); },
    [=](console_atom, std::string& line) { on_console_line(self, line); },
    [=](output_atom, const v1::OutputChunk& chunk) { on_output(self, chunk); },
    [=](start_atom) {
      auto& st = self->state;
      if (st.started)
        return;
      st.started = true;
      auto timeout = st.job.timeout_seconds() ? st.job.timeout_seconds()
                     : st.config.default_job_timeout_seconds()
                       ? st.config.default_job_timeout_seconds()
                       : 3600u;
      st.job.set_timeout_seconds(timeout);
      st.deadline = self->clock().now() + seconds(timeout);
      self->delayed_send(self, std::min<caf::actor_clock::duration_type>(seconds(timeout),
                                                                         deadline_check),
                         timeout_atom::value, job_deadline_token);
      set_state(self, v1::QUEUED);
      acquire_slot(self);
    },
    [=](cancel_atom) {
      auto& st = self->state;
      if (st.debug_token != 0 && !st.cleaned_up && st.shutdown_started &&
          st.shutdown_stage.empty()) {
        st.debug_token = 0;
        shut_down_vm(self);
        return;
      }
      finish_job(self, v1::CANCELLED, "cancelled");
    },
    [=](timeout_atom, uint64_t token) {
      auto& st = self->state;
      if (token == st.held_error_token && !st.held_error.empty()) {
        auto message = std::exchange(st.held_error, {});
        decide_infrastructure_error(self, message);
      } else if (token == job_deadline_token) {
        auto now = self->clock().now();
        if (st.cleaned_up)
          return;
        if (now < st.deadline) {
          self->delayed_send(self,
                             std::min<caf::actor_clock::duration_type>(st.deadline - now,
                                                                       deadline_check),
                             timeout_atom::value, job_deadline_token);
          return;
        }
        if (!st.finishing)
          finish_job(self, v1::TIMED_OUT,
                     "job timed out after " + std::to_string(st.job.timeout_seconds()) + " s");
      } else if (token == st.slot_token && !st.slot) {
        acquire_slot(self);
      } else if (token == st.debug_token) {
        st.debug_token = 0;
        shut_down_vm(self);
      } else if (token == st.shutdown_token && !st.qemu_exited && !st.cleaned_up) {
        if (st.shutdown_stage == "powerdown") {
          notice(self, "the guest did not power off in time; quitting QEMU");
          quit_stage(self);
        } else if (st.shutdown_stage == "quit") {
          notice(self, "QEMU did not quit in time; killing it");
          kill_stage(self);
        } else {
          if (st.error.empty())
            st.error = "QEMU did not exit after SIGKILL";
          cleanup(self);
        }
      }
    },
  };
}

}  // namespace solstice
