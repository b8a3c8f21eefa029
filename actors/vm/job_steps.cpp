// The job supervisor's work in the guest: the set-up command, uploads, steps one
// after another, artifacts, and the steps' output with its flow control back to
// the SSH reader. The lifecycle around it is in job_supervisor.cpp.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>

#include <caf/send.hpp>

#include "actors/runner_types.hpp"
#include "actors/vm/job_supervisor.hpp"
#include "actors/vm/job_supervisor_parts.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/job/disk_limits.hpp"
#include "runtime/job/guest_commands.hpp"
#include "runtime/job/job_result.hpp"
#include "runtime/vm/identity_channel.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice::supervision {

namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using phase = job_phase;

// A cold boot's set-up finds it out; a clone's template recorded it.
constexpr const char* cloud_init_errors_notice =
  "cloud-init finished with errors in the guest (`cloud-init status --long` there says "
  "which); the job goes on";

}  // namespace

// ------------------------------------------------------------------ artifacts

static std::string artifact_local_name(const v1::Artifact& artifact) {
  if (!artifact.destination().empty())
    return artifact.destination();
  return fs::path(artifact.path()).filename().string();
}

static void artifact_missing(supervisor_pointer self, int index, const caf::error& err) {
  auto& st = self->state;
  const auto& artifact = st.job.artifacts(index);
  auto message = "artifact " + artifact.path() + ": " + error_text(err);
  if (artifact.optional()) {
    notice(self, message + " (optional, skipped)");
    return;
  }
  error_event(self, redact_text(st, message));
  if (st.status == v1::SUCCEEDED)
    st.status = v1::FAILED;
  if (st.error.empty())
    st.error = redact_text(st, message);
}

// Over artifacts_max_bytes: the job fails, and none of its artifacts stay on the
// host (the download stopped at the bound and removed its partial file; this removes
// the ones before it).
static void artifacts_over_cap(supervisor_pointer self, int index, const caf::error& err) {
  auto& st = self->state;
  std::error_code ignored;
  fs::remove_all(fs::path(st.vm.job_dir()) / "artifacts", ignored);
  st.result.clear_artifacts();
  auto message = artifacts_cap_message(disk_limits_of(st.config).artifacts_max_bytes,
                                       st.job.artifacts(index).path());
  notice(self, redact_text(st, "artifact " + st.job.artifacts(index).path() + ": " + error_text(err)));
  end_phase(self, "artifacts");
  st.status.reset();
  decide(self, v1::FAILED, st.error.empty() ? message : st.error + "; " + message);
}

// The bytes artifact downloads may still write (UINT64_MAX: no bound).
static uint64_t artifact_bytes_left(const job_supervisor_state& st) {
  const uint64_t cap = disk_limits_of(st.config).artifacts_max_bytes;
  if (cap == 0)
    return UINT64_MAX;
  return cap > st.artifact_bytes ? cap - st.artifact_bytes : 0;
}

static void collect_artifact(supervisor_pointer self, int index) {
  auto& st = self->state;
  if (index >= st.job.artifacts_size()) {
    end_phase(self, "artifacts");
    // Steps decided the status; a missing artifact may have turned it to failed.
    auto status = *st.status;
    st.status.reset();
    return decide(self, status, "");
  }
  const auto& artifact = st.job.artifacts(index);
  auto local = fs::path(st.vm.job_dir()) / "artifacts" / artifact_local_name(artifact);
  self->request(st.shell, st.timeouts.transfer, download_atom::value, artifact.path(),
                local.string(), artifact_bytes_left(st))
    .then(
      [=](ok_atom) {
        if (self->state.phase != phase::artifacts)
          return unexpected(self, "artifact downloaded");
        std::error_code ec;
        const auto size = fs::file_size(local, ec);
        self->state.artifact_bytes += ec ? 0 : size;
        self->state.result.add_artifacts(local.string());
        collect_artifact(self, index + 1);
      },
      [=](caf::error& err) {
        if (self->state.phase != phase::artifacts)
          return unexpected(self, "artifact failed");
        if (err == runner_errc::limit_exceeded)
          return artifacts_over_cap(self, index, err);
        artifact_missing(self, index, err);
        collect_artifact(self, index + 1);
      });
}

// After the steps (all of them, or up to a failing one): `status` is what they
// decided; artifacts are collected either way.
static void collect_artifacts(supervisor_pointer self, v1::JobStatus status) {
  auto& st = self->state;
  if (st.job.artifacts_size() == 0)
    return decide(self, status, "");
  st.status = status;  // provisional: a missing artifact may turn it to failed
  st.phase = phase::artifacts;
  set_state(self, v1::COLLECTING_ARTIFACTS);
  begin_phase(self, "artifacts");
  (void)make_private_dir(fs::path(st.vm.job_dir()) / "artifacts");
  collect_artifact(self, 0);
}

// ------------------------------------------------------------------ steps

static void flush_step_output(supervisor_pointer self, unsigned index) {
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

static void run_step(supervisor_pointer self, unsigned index);

// What comes after a step, when the job is still undecided.
static void after_step(supervisor_pointer self, unsigned index, const v1::StepResult& result) {
  auto& st = self->state;
  const auto& step = st.job.steps(static_cast<int>(index));
  if (result.outcome() == v1::STEP_FAILED) {
    st.error = redact_text(st, step_failure_reason(step.name(), result));
    return collect_artifacts(self, v1::FAILED);
  }
  if (result.outcome() == v1::STEP_TIMED_OUT && !step.allow_failure())
    return decide(self, v1::TIMED_OUT,
                  "step '" + step.name() + "' timed out after " +
                    std::to_string(step.timeout_seconds()) + " s");
  if (result.outcome() == v1::STEP_CANCELLED)
    return;  // whoever cancelled has decided already
  if (index + 1 < static_cast<unsigned>(st.job.steps_size()))
    return run_step(self, index + 1);
  collect_artifacts(self, v1::SUCCEEDED);
}

void step_finished(supervisor_pointer self, unsigned index, v1::StepResult result) {
  auto& st = self->state;
  start_done(self);  // a step that printed nothing ends the start too
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
  if (st.phase == phase::steps)
    after_step(self, index, result);
}

static void run_step(supervisor_pointer self, unsigned index) {
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
  // One round trip: the command writes the script from its stdin, then runs it;
  // or only runs it, where a clone's identity agent wrote it with the job's files.
  const bool written = !st.vm.incoming_state().empty() && st.vm.job_files_made() && step_scripts_fit(st.job);
  self->request(st.shell, reply_deadline, exec_atom::value, index,
                written ? step_command_written(index) : step_command(index),
                written ? std::string{} : make_step_script(step.script()),
                static_cast<uint32_t>(step_timeout.count()))
    .then([=](v1::StepResult& result) { step_finished(self, index, std::move(result)); },
          [=](caf::error& err) {
            auto& st = self->state;
            if (st.phase != phase::steps) {  // the VM is going: the step was interrupted
              v1::StepResult result;
              result.set_outcome(v1::STEP_CANCELLED);
              return step_finished(self, index, std::move(result));
            }
            shell_failure(self, "step '" + st.job.steps(static_cast<int>(index)).name() +
                                  "' could not run: " + error_text(err));
          });
}

static void start_steps(supervisor_pointer self) {
  auto& st = self->state;
  st.phase = phase::steps;
  if (st.job.steps_size() == 0)
    return collect_artifacts(self, v1::SUCCEEDED);
  run_step(self, 0);
}

static std::string upload_name(const v1::Upload& upload) {
  return "upload " + (upload.has_content() ? std::string{"(packed content)"} : upload.source()) + " -> " +
         upload.destination();
}

static void upload_file(supervisor_pointer self, int index) {
  auto& st = self->state;
  if (index >= st.job.uploads_size())
    return start_steps(self);
  const auto& upload = st.job.uploads(index);
  auto mode = upload.mode() ? upload.mode() : 0644u;
  // A packed upload (a submitted job's) carries its bytes; a local one names its file.
  auto request = upload.has_content()
                   ? self->request(st.shell, st.timeouts.transfer, upload_atom::value,
                                   upload.content(), upload.destination(), mode)
                   : self->request(st.shell, st.timeouts.transfer, put_file_atom::value,
                                   upload.source(), upload.destination(), mode);
  std::move(request).then(
      [=](ok_atom) {
        if (self->state.phase != phase::uploads)
          return unexpected(self, "upload done");
        upload_file(self, index + 1);
      },
      [=](caf::error& err) {
        decide(self, v1::FAILED, upload_name(self->state.job.uploads(index)) + ": " + error_text(err));
      });
}

// The last non-empty line of a guest command's stderr.
static std::string last_line(const std::string& text) {
  auto end = text.find_last_not_of("\r\n");
  if (end == std::string::npos)
    return {};
  auto begin = text.rfind('\n', end);
  begin = begin == std::string::npos ? 0 : begin + 1;
  return text.substr(begin, end - begin + 1);
}

// What the guest's copy from the uploads ISO answered (uploads_iso_command).
static void uploads_copied(supervisor_pointer self, const v1::StepResult& result) {
  auto& st = self->state;
  end_phase(self, "uploads_iso");
  if (result.exit_code() == 0)
    return start_steps(self);
  const auto why = last_line(result.runner_stderr());
  if (result.exit_code() == uploads_iso_unusable_exit) {
    notice(self, "the uploads ISO cannot be used in this guest (" + why + "): the uploads go over SFTP");
    return upload_file(self, 0);
  }
  // "upload INDEX: why"
  int index = -1, consumed = 0;
  if (result.exit_code() == uploads_iso_failed_exit &&
      std::sscanf(why.c_str(), "upload %d: %n", &index, &consumed) == 1 && consumed > 0 && index >= 0 &&
      index < st.job.uploads_size())
    return decide(self, v1::FAILED, upload_name(st.job.uploads(index)) + ": " + why.substr(static_cast<size_t>(consumed)));
  decide(self, v1::FAILED, "the uploads (copied from their ISO in the guest): exit code " +
                             std::to_string(result.exit_code()) + (why.empty() ? "" : ": " + why));
}

// Prepare put the uploads on an ISO in the VM's uploads drive: one guest command
// copies them all into place (the same destinations, modes and owner as SFTP).
static void copy_uploads_from_iso(supervisor_pointer self) {
  auto& st = self->state;
  std::vector<IsoUpload> uploads;
  for (int i = 0; i < st.job.uploads_size(); ++i) {
    const auto& upload = st.job.uploads(i);
    uploads.push_back({i, upload.destination(), upload.mode() ? upload.mode() : 0644u});
  }
  // Its own phase in the result: it says the uploads went this way, and how long.
  begin_phase(self, "uploads_iso");
  self->request(st.shell, st.timeouts.transfer + std::chrono::seconds(30), exec_atom::value,
                runner_setup_step, uploads_iso_command(uploads_iso_label, uploads), std::string{},
                static_cast<uint32_t>(st.timeouts.transfer.count()))
    .then(
      [=](v1::StepResult& result) {
        if (self->state.phase != phase::uploads)
          return unexpected(self, "uploads copied");
        uploads_copied(self, result);
      },
      [=](caf::error& err) {
        if (self->state.phase != phase::uploads)
          return unexpected(self, "uploads copy failed");
        end_phase(self, "uploads_iso");
        decide(self, v1::FAILED, "the uploads (copied from their ISO in the guest): " + error_text(err));
      });
}

// The uploads go on the ISO prepare made, else one by one over SFTP.
static void start_uploads(supervisor_pointer self) {
  auto& st = self->state;
  st.phase = phase::uploads;
  if (!st.vm.uploads_iso_note().empty())
    notice(self, st.vm.uploads_iso_note());
  if (st.vm.uploads_iso().empty() || st.job.uploads_size() == 0)
    return upload_file(self, 0);
  copy_uploads_from_iso(self);
}

// The set-up, the identity and the reconnect belong to bringing the VM up: each
// gets the boot's time (boot_timeout_seconds), at least a minute. Eight clones
// restoring at once on two TCG cores need minutes for what takes a second alone.
static uint32_t bring_up_timeout_ms(const job_supervisor_state& st) {
  const uint32_t boot_seconds = st.config.boot_timeout_seconds() ? st.config.boot_timeout_seconds() : 300;
  return std::max<uint32_t>(60, boot_seconds) * 1000;
}

// The first use of the guest shell: it waits for cloud-init where the guest runs
// it (see setup_command), then makes directories for the job's files and for
// every upload destination, and the environment file, written from the
// command's stdin (secrets never appear in a command line). One round trip.
static void create_job_files(supervisor_pointer self) {
  auto& st = self->state;
  // Its own phase: on a cloud-init guest it holds the wait for cloud-init.
  begin_phase(self, "setup");
  auto files = guest_job_files(st.job);
  // The set-up waits for cloud-init to finish, which belongs to the boot.
  self->request(st.shell, st.timeouts.transfer, exec_atom::value, runner_setup_step,
                setup_command(files.directories), files.env_file, bring_up_timeout_ms(st))
    .then(
      [=](v1::StepResult& result) {
        auto& st = self->state;
        if (st.phase != phase::setup)
          return unexpected(self, "set-up done");
        end_phase(self, "setup");
        if (result.exit_code() == setup_cloud_init_failed_exit)
          notice(self, cloud_init_errors_notice);
        else if (result.exit_code() != 0)
          return infrastructure_error(
            self, with_console_tail(st, "cannot create the job's directories and " +
                                          env_file_path() + " in the guest (exit code " +
                                          std::to_string(result.exit_code()) + ")"));
        start_uploads(self);
      },
      [=](caf::error& err) {
        if (self->state.phase != phase::setup)
          return unexpected(self, "set-up failed");
        end_phase(self, "setup");
        shell_failure(self, "cannot prepare the guest (the set-up first waits for cloud-init, "
                            "where the guest runs it): " + error_text(err));
      });
}

// A restored clone still has its template's identity: before anything of the job
// runs it gets its own (the job's key only, a new host key, the host's clock, a
// reseeded RNG, hostname, instance id), and the shell reconnects with the job's key
// and checks the new host key.
static void give_fresh_identity(supervisor_pointer self) {
  auto& st = self->state;
  begin_phase(self, "identity");
  self->request(st.shell, st.timeouts.transfer, exec_atom::value, runner_setup_step,
                identity_command(), clone_identity_input(st.vm), bring_up_timeout_ms(st))
    .then(
      [=](v1::StepResult& result) {
        auto& st = self->state;
        if (st.phase != phase::setup)
          return unexpected(self, "identity done");
        if (result.exit_code() != 0)
          return infrastructure_error(
            self, "cannot give the restored guest its own identity (exit code " +
                    std::to_string(result.exit_code()) + ")");
        self->request(st.shell, st.timeouts.transfer, rekey_atom::value, st.vm, bring_up_timeout_ms(self->state))
          .then(
            [=](ok_atom) {
              if (self->state.phase != phase::setup)
                return unexpected(self, "rekeyed");
              end_phase(self, "identity");
              create_job_files(self);
            },
            [=](caf::error& err) {
              if (self->state.phase != phase::setup)
                return unexpected(self, "rekey failed");
              shell_failure(self, "the restored guest's new identity: " + error_text(err));
            });
      },
      [=](caf::error& err) {
        if (self->state.phase != phase::setup)
          return unexpected(self, "identity failed");
        shell_failure(self, "cannot give the restored guest its own identity: " + error_text(err));
      });
}

void set_up_guest(supervisor_pointer self) {
  auto& st = self->state;
  start_nearly_done(self);  // the guest is up: the next restored job may start soon
  st.phase = phase::setup;
  end_phase(self, "console_handoff");
  set_state(self, v1::RUNNING);
  // A clone whose guest took its identity over its identity port before SSH has
  // no boot key left in its handle: only the others get it here, over SSH.
  if (!st.vm.incoming_state().empty() && !st.vm.boot_private_key().empty())
    return give_fresh_identity(self);
  // The identity agent made the job's files with the identity (in its `identity`
  // phase; its template waited for cloud-init before it was saved): no set-up.
  if (!st.vm.incoming_state().empty() && st.vm.job_files_made()) {
    if (st.image.restore_from().cloud_init_errors())
      notice(self, cloud_init_errors_notice);
    return start_uploads(self);
  }
  create_job_files(self);
}

// ------------------------------------------------------------------ output and flow control

// Sink `index` has handled `bytes` more of the executor's output: credit the
// executor with what every sink has now handled (its worker waits when too much
// is in flight, so the slowest sink paces the step).
static void output_handled(supervisor_pointer self, size_t index, uint64_t bytes) {
  auto& st = self->state;
  st.sink_handled_bytes[index] += bytes;
  auto all_handled = *std::min_element(st.sink_handled_bytes.begin(), st.sink_handled_bytes.end());
  if (all_handled > st.output_credited_bytes && st.shell)
    self->send(st.shell, ack_atom::value, all_handled - st.output_credited_bytes);
  st.output_credited_bytes = std::max(st.output_credited_bytes, all_handled);
}

// Output events go to the sinks as requests: the (empty) reply of a sink's
// handler is its acknowledgement. A sink that is gone answers with an error,
// which counts as handled: nothing is queued for it any more.
static void emit_output(supervisor_pointer self, v1::JobEvent event, uint64_t chunk_bytes) {
  auto& st = self->state;
  event.set_job_id(st.job.id());
  event.set_sequence(st.event_sequence++);
  event.set_timestamp_us(unix_now_us());
  metrics().output_bytes(event.output().stream(), event.output().data().size());
  for (size_t i = 0; i < st.sinks.size(); ++i)
    self->request(st.sinks[i], caf::infinite, event_atom::value, event)
      .then([=]() { output_handled(self, i, chunk_bytes); },
            [=](caf::error&) { output_handled(self, i, chunk_bytes); });
}

void on_output(supervisor_pointer self, const v1::OutputChunk& chunk) {
  auto& st = self->state;
  start_done(self);  // its first output: its start is over
  const uint64_t chunk_bytes = chunk.data().size();
  if (st.sink_handled_bytes.size() != st.sinks.size())
    st.sink_handled_bytes.assign(st.sinks.size(), st.output_credited_bytes);
  auto not_queued = [&] {
    for (auto& handled : st.sink_handled_bytes)
      handled += chunk_bytes;
    if (st.shell)
      self->send(st.shell, ack_atom::value, chunk_bytes);
    st.output_credited_bytes += chunk_bytes;
  };
  // Only the running step's output is shown (the set-up command's is not).
  if (!st.running_step || chunk.step_index() != *st.running_step)
    return not_queued();
  bool is_out = chunk.stream() == v1::STDOUT;
  auto& redactor = is_out ? st.stdout_redactor : st.stderr_redactor;
  auto data = redactor ? redactor->feed(chunk.data()) : chunk.data();
  if (data.empty() || st.sinks.empty())
    return not_queued();
  v1::JobEvent event;
  auto* out = event.mutable_output();
  out->set_step_index(chunk.step_index());
  out->set_stream(chunk.stream());
  out->set_sequence(is_out ? st.stdout_sequence++ : st.stderr_sequence++);
  out->set_data(std::move(data));
  emit_output(self, std::move(event), chunk_bytes);
}

}  // namespace solstice::supervision
