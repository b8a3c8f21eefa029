#include "actors/vm/qemu_process.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <mutex>
#include <vector>

#include <caf/send.hpp>

#include "actors/runner_types.hpp"
#include "runtime/base/proc_stat.hpp"
#include "runtime/vm/guest_firewall.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/recovery.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace {

// Without a pidfd (old kernels) QEMU's exit is only seen by polling this often;
// with one, this is a safety net and the exit is seen at once.
constexpr auto poll_interval = std::chrono::milliseconds(10);
constexpr auto fallback_interval = std::chrono::milliseconds(250);
constexpr size_t stderr_tail_limit = 8192;

void drain_stderr(qemu_process_state& st) {
  if (!st.child || st.child->stderr_fd() < 0)
    return;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(st.child->stderr_fd(), buf, sizeof buf)) > 0) {
    st.stderr_tail.append(buf, static_cast<size_t>(n));
    if (st.stderr_tail.size() > stderr_tail_limit)
      st.stderr_tail.erase(0, st.stderr_tail.size() - stderr_tail_limit);
  }
  if (n == 0)
    st.stderr_closed = true;  // at EOF the pipe stays readable: stop watching it
}

std::vector<int> watched_fds(const qemu_process_state& st) {
  std::vector<int> fds{st.child->exit_fd()};
  if (!st.stderr_closed)
    fds.push_back(st.child->stderr_fd());
  return fds;
}

// Without a dedicated QEMU user there is no uid to bind the firewall rules to.
void warn_host_reachable_once() {
  static std::once_flag warned;
  std::call_once(warned, [] {
    // stderr: with --json stdout holds only event lines.
    std::fprintf(stderr, "solstice-runner: warning: QEMU runs as the runner's own user: guests "
                         "can reach services on this host's loopback and addresses (run the "
                         "runner as root with a qemu_user to wall them off)\n");
  });
}

VmFiles vm_files_of(const v1::VmHandle& handle, const v1::RunnerConfig& config,
                    const v1::ImageSpec& image) {
  VmFiles files;
  files.state_dir = config.state_dir();
  files.work_dir = handle.work_dir();
  if (!handle.snapshot())
    files.writable_disk = handle.disk();  // the overlay; its backing file is image.disk()
  files.seed_iso = handle.seed_iso();
  files.uploads_iso = handle.uploads_iso();
  files.firmware_vars = handle.firmware_vars();
  files.read_only = {image.disk(), image.kernel(), image.initrd(), handle.firmware_code(),
                     image.restore_from().frozen_overlay()};
  return files;
}

// QEMU sandboxed, as its own user when there is one, writing the console capture
// through a descriptor the runner opened.
Result<ChildProcess> spawn_qemu(qemu_process_state& st) {
  auto spec = vm_spec_from_handle(st.handle);
  SpawnOptions options;
  options.capture_stdout = false;
  if (st.qemu_user) {
    if (auto shared = share_vm_files(*st.qemu_user, st.vm_files); !shared)
      return tl::unexpected(shared.error());
    options.run_as = st.qemu_user->credentials;
  }
  int console_fd = -1;
  if (!spec.console_log.empty()) {
    console_fd = ::open(spec.console_log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (console_fd < 0)
      return fail(errno_message("cannot open the console capture " + spec.console_log.string(), errno));
    options.pass_fds = {console_fd};
    spec.console_fd = 3;  // the first passed descriptor
  }
  // A restore: QEMU reads the template's migration stream through a descriptor
  // (QMP migrate-incoming fd:N), so it needs no access to the template's files.
  int state_fd = -1;
  if (!st.handle.incoming_state().empty()) {
    state_fd = ::open(st.handle.incoming_state().c_str(), O_RDONLY | O_CLOEXEC);
    if (state_fd < 0) {
      if (console_fd >= 0)
        ::close(console_fd);
      return fail(errno_message("cannot open the template's state " + st.handle.incoming_state(), errno));
    }
    options.pass_fds.push_back(state_fd);
  }
  auto child = ChildProcess::spawn(build_qemu_argv(spec), options);
  if (console_fd >= 0)
    ::close(console_fd);  // QEMU has its own copy
  if (state_fd >= 0)
    ::close(state_fd);
  if (!child)
    return fail("cannot start QEMU" + (st.qemu_user ? " as user " + st.qemu_user->name : "") +
                ": " + child.error().message);
  return child;
}

v1::ProcessExit to_process_exit(const ExitStatus& status, const std::string& stderr_tail) {
  v1::ProcessExit exit;
  exit.set_signaled(status.signaled);
  exit.set_code(status.code);
  exit.set_signal(status.signal);
  exit.set_description(status.describe());
  exit.set_stderr_tail(stderr_tail);
  return exit;
}

}  // namespace

qemu_process_state::~qemu_process_state() {
  // The actor is gone: nothing may outlive it. ChildProcess kills and reaps QEMU.
  waiter.reset();  // first: it polls the child's fds
  child.reset();
  if (prepared)
    (void)cleanup_vm(handle);
}

qemu_process_internal::behavior_type
qemu_process(qemu_process_internal::stateful_pointer<qemu_process_state> self,
             qemu_observer_actor observer) {
  self->state.observer = std::move(observer);
  return {
    [=](prepare_atom, const v1::JobSpec& job, const v1::ImageSpec& image,
        const v1::RunnerConfig& config, uint32_t attempt) -> caf::result<v1::VmHandle> {
      // Before anything is made: a missing user fails the job with nothing to clean.
      auto qemu_user = resolve_qemu_user(configured_qemu_user(config));
      if (!qemu_user)
        return caf::make_error(runner_errc::prepare_failed, qemu_user.error().message);
      if (*qemu_user) {
        // QEMU's user may open no connection to the host itself (guest_firewall.hpp).
        if (auto walled = wall_off_host((*qemu_user)->credentials.uid); !walled)
          return caf::make_error(runner_errc::prepare_failed, walled.error().message);
      } else {
        warn_host_reachable_once();
      }
      auto handle = prepare_vm(job, image, config, attempt);
      if (!handle)
        return caf::make_error(runner_errc::prepare_failed, handle.error().message);
      self->state.handle = *handle;
      self->state.prepared = true;
      self->state.qemu_user = std::move(*qemu_user);
      self->state.vm_files = vm_files_of(*handle, config, image);
      // Claim the work directory at once, so a later runner knows whose it is.
      if (auto owned = write_owner_record(handle->work_dir(), owner_record_for(*handle)); !owned)
        return caf::make_error(runner_errc::prepare_failed, owned.error().message);
      return *handle;
    },
    [=](launch_atom) -> caf::result<v1::VmHandle> {
      auto& st = self->state;
      if (!st.prepared)
        return caf::make_error(runner_errc::qemu_failed, "launch before prepare");
      auto child = spawn_qemu(st);
      if (!child)
        return caf::make_error(runner_errc::qemu_failed, child.error().message);
      st.child = std::move(*child);
      st.running_count.emplace();
      st.handle.set_qemu_pid(st.child->pid());
      st.handle.set_qemu_start_time(process_start_time(st.child->pid()).value_or(0));
      // Lets a later runner kill this QEMU if it outlives the runner.
      if (auto owned = write_owner_record(st.handle.work_dir(), owner_record_for(st.handle)); !owned)
        return caf::make_error(runner_errc::qemu_failed, owned.error().message);
      if (st.child->exit_fd() >= 0) {
        st.waiter = std::make_unique<FdWaiter>(
          watched_fds(st),
          [addr = self->address()] {
            if (auto me = caf::actor_cast<caf::actor>(addr))
              caf::anon_send(me, tick_atom::value);
          },
          fallback_interval);
      } else {
        self->delayed_send(self, poll_interval, tick_atom::value);
      }
      return st.handle;
    },
    [=](kill_atom) {
      if (self->state.child)
        self->state.child->kill(SIGKILL);
    },
    [=](cleanup_atom) -> caf::result<ok_atom> {
      auto& st = self->state;
      if (st.child) {
        st.child->kill(SIGKILL);
        st.child->wait_for(std::chrono::seconds(5));
        st.waiter.reset();
        st.child.reset();
        st.running_count.reset();
      }
      if (st.prepared) {
        st.prepared = false;
        if (auto ok = cleanup_vm(st.handle); !ok)
          return caf::make_error(runner_errc::qemu_failed, ok.error().message);
      }
      return ok_atom::value;
    },
    [=](tick_atom) {
      auto& st = self->state;
      if (!st.child || st.exit_reported)
        return;
      drain_stderr(st);
      if (auto status = st.child->try_wait()) {
        drain_stderr(st);
        st.exit_reported = true;
        st.running_count.reset();
        self->send(st.observer, exited_atom::value, to_process_exit(*status, st.stderr_tail));
        return;
      }
      if (st.waiter)
        st.waiter->rearm(watched_fds(st));
      else
        self->delayed_send(self, poll_interval, tick_atom::value);
    },
  };
}

}  // namespace solstice
