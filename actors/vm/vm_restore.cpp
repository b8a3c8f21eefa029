// The restore path of a VM attempt: a clone of a template reaches `booted` by
// loading the template's state instead of booting. QEMU was started with
// `-incoming defer` and the state file as an inherited descriptor; QMP
// `migrate-incoming fd:N` loads it, query-migrate says when it is done, `cont`
// runs the guest. Where the template's guest runs the identity agent, the clone
// then gets its own identity over its virtio-serial port (the runner connected to
// it before the state was loaded) and SSH readiness is checked with the job's own
// key and host key: one SSH handshake. Otherwise SSH readiness is checked with the
// template's key and host key, which the job's set-up then replaces over SSH.
#include <caf/send.hpp>
#include <nlohmann/json.hpp>

#include "actors/runner_types.hpp"
#include "actors/vm/vm_attempt_parts.hpp"
#include "runtime/vm/identity_channel.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice::attempt {

namespace {

using phase = attempt_phase;
using std::chrono::milliseconds;

constexpr auto restore_poll_interval = milliseconds(20);

// QEMU's reply to a command as JSON ("" when it is not JSON: then a null).
nlohmann::json reply_json(const std::string& reply) {
  return nlohmann::json::parse(reply, nullptr, false);
}

// The clone takes its identity over its port, and its job's directories and env
// file with it (no set-up exec then: a program start less on the emulated CPU,
// and the first exec over SSH is the first step). From then on its guest has the
// job's key and host key only, and the handle says so (no boot key: `ready` and
// the job's steps use the job's own).
void give_identity(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::identifying;
  self->send(st.observer, timing_atom::value, std::string{"identity"}, true);
  auto timeout = boot_timeout_of(st);
  auto files = guest_job_files(st.spec.job);
  self->request(st.ssh, timeout + std::chrono::seconds(30), identity_atom::value, st.vm,
                std::move(files.directories), std::move(files.env_file), std::move(files.step_scripts),
                static_cast<uint32_t>(timeout.count()))
    .then(
      [=](const std::string& files_note) {
        auto& st = self->state;
        if (st.phase != phase::identifying)
          return unexpected(self, "identity given");
        st.vm.clear_boot_private_key();
        st.vm.clear_boot_host_key();
        // Otherwise the job's set-up makes them, and says what goes wrong.
        st.vm.set_job_files_made(files_note.empty());
        if (!files_note.empty())
          self->send(st.observer, notice_atom::value,
                     "the identity agent did not make the job's files (the set-up makes them): " +
                       files_note);
        self->send(st.observer, timing_atom::value, std::string{"identity"}, false);
        wait_for_ssh(self);
      },
      [=](caf::error& err) {
        boot_problem(self, "the restored guest did not take its identity over its virtio-serial "
                           "port: " + error_text(err));
      });
}

// After the restore, the identity (over its port, where the agent waits) or SSH.
void after_restore(attempt_pointer self) {
  if (self->state.vm.identity_agent())
    return give_identity(self);
  wait_for_ssh(self);
}

// A clone's uploads drive was empty in its template: the job's uploads ISO goes
// in now (the guest sees the medium change when the job's uploads look for it).
// Should QEMU refuse, the uploads go over SFTP instead, with a notice.
void insert_uploads_iso(attempt_pointer self) {
  auto& st = self->state;
  nlohmann::json args = {{"id", uploads_drive_id}, {"filename", st.vm.uploads_iso()},
                         {"format", "raw"}, {"read-only-mode", "read-only"}};
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value,
                std::string{"blockdev-change-medium"}, args.dump())
    .then(
      [=](const std::string&) {
        if (self->state.phase != phase::restoring)
          return unexpected(self, "blockdev-change-medium reply");
        after_restore(self);
      },
      [=](caf::error& err) {
        auto& st = self->state;
        if (st.phase != phase::restoring)
          return unexpected(self, "blockdev-change-medium failed");
        st.vm.set_uploads_iso_note("QEMU did not take the uploads ISO into the restored VM's drive (" +
                                   error_text(err) + "): the uploads go over SFTP");
        st.vm.clear_uploads_iso();
        after_restore(self);
      });
}

void run_guest(attempt_pointer self) {
  auto& st = self->state;
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value, std::string{"cont"},
                std::string{"{}"})
    .then(
      [=](const std::string&) {
        if (self->state.phase != phase::restoring)
          return unexpected(self, "cont reply");
        if (!self->state.vm.uploads_iso().empty())
          return insert_uploads_iso(self);
        after_restore(self);
      },
      [=](caf::error& err) {
        boot_problem(self, "cannot run the restored guest (cont): " + error_text(err));
      });
}

void load_state(attempt_pointer self) {
  auto& st = self->state;
  nlohmann::json args = {{"uri", "fd:" + std::to_string(incoming_fd_number(st.vm))}};
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value,
                std::string{"migrate-incoming"}, args.dump())
    .then(
      [=](const std::string&) {
        if (self->state.phase != phase::restoring)
          return unexpected(self, "migrate-incoming reply");
        poll_restore(self);
      },
      [=](caf::error& err) {
        boot_problem(self, "QEMU refused the template's state: " + error_text(err));
      });
}

}  // namespace

void restore_state(attempt_pointer self) {
  auto& st = self->state;
  st.phase = phase::restoring;
  tell_phase(self, v1::BOOTING, "restoring template " + st.vm.template_id());
  if (!st.vm.identity_agent())
    return load_state(self);
  // Connected before the state is loaded: the guest's agent, which was saved
  // waiting on the port with the host side open, never sees it closed.
  make_ssh_executor(self);
  self->request(st.ssh, st.timeouts.qmp_connect + std::chrono::seconds(5), connect_atom::value,
                st.vm.identity_socket(), static_cast<uint32_t>(st.timeouts.qmp_connect.count()))
    .then(
      [=](ok_atom) {
        if (self->state.phase != phase::restoring)
          return unexpected(self, "identity port connected");
        load_state(self);
      },
      [=](caf::error& err) {
        boot_problem(self, "cannot connect to the clone's identity port: " + error_text(err));
      });
}

void poll_restore(attempt_pointer self) {
  auto& st = self->state;
  self->request(st.qmp, st.timeouts.qmp_command, command_atom::value,
                std::string{"query-migrate"}, std::string{"{}"})
    .then(
      [=](const std::string& reply) {
        auto& st = self->state;
        if (st.phase != phase::restoring)
          return unexpected(self, "query-migrate reply");
        auto status = reply_json(reply);
        auto state = status.is_object() ? status.value("status", std::string{}) : std::string{};
        if (state == "completed")
          return run_guest(self);
        if (state == "failed" || state == "cancelled")
          return boot_problem(self, "QEMU could not load the template's state: " +
                                      (status.is_object() ? status.value("error-desc", state) : state));
        // Still loading (or not begun): ask again shortly. A corrupt stream makes
        // QEMU exit, which the exit report turns into the boot failure.
        st.restore_token = st.next_token++;
        self->delayed_send(self, restore_poll_interval, timeout_atom::value, st.restore_token);
      },
      [=](caf::error& err) {
        boot_problem(self, "cannot follow the restore (query-migrate): " + error_text(err));
      });
}

}  // namespace solstice::attempt
