#include "runtime/vm/template_build.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <deque>
#include <fstream>
#include <optional>
#include <sstream>
#include <thread>

#include "runtime/base/child_process.hpp"
#include "runtime/base/proc_stat.hpp"
#include "runtime/base/idle_watch.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/job/guest_commands.hpp"
#include "runtime/vm/identity_channel.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/ssh/ssh_session.hpp"
#include "runtime/vm/cloud_init.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "runtime/vm/qemu_user.hpp"
#include "runtime/vm/qmp.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

std::string file_tail(const fs::path& path, size_t lines) {
  std::ifstream in(path);
  std::deque<std::string> kept;
  for (std::string line; std::getline(in, line);) {
    kept.push_back(line);
    if (kept.size() > lines)
      kept.pop_front();
  }
  std::string out;
  for (const auto& line : kept)
    out += "\n  | " + line;
  return out.empty() ? out : "\nlast console lines:" + out;
}

Result<void> write_file(const fs::path& path, const std::string& text, mode_t mode) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0)
    return fail(errno_message("cannot create " + path.string(), errno));
  bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  if (!ok)
    return fail("cannot write " + path.string());
  return {};
}

// The template's identity, its seed and its overlay, in `dir`.
Result<VmSpec> make_template_files(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                   const TemplateKey& key, const std::string& accel,
                                   const fs::path& dir, SshTarget& target) {
  auto user_key = generate_ed25519("solstice-template");
  auto host_key = generate_ed25519("solstice-template-host");
  if (!user_key || !host_key)
    return fail("cannot generate the template's keys");
  if (auto ok = write_private_key(*user_key, dir / "key"); !ok)
    return tl::unexpected(ok.error());
  if (auto ok = write_file(dir / "key.pub", user_key->public_line, 0600); !ok)
    return tl::unexpected(ok.error());
  if (auto ok = write_file(dir / "host_key.blob", host_key->public_blob, 0600); !ok)
    return tl::unexpected(ok.error());
  target.user = image.user().empty() ? "runner" : image.user();
  target.private_key = user_key->private_openssh;
  target.public_key = user_key->public_line;
  target.expected_host_key = host_key->public_blob;

  SeedSpec seed;
  seed.instance_id = "solstice-template-" + key.id;
  seed.hostname = "solstice-template";
  seed.user = target.user;
  seed.authorized_key = user_key->public_line;
  seed.host_key_private = host_key->private_openssh;
  seed.host_key_public = host_key->public_line;
  if (auto ok = write_seed_iso(seed, dir / "seed.iso"); !ok)
    return fail("cannot write the template's seed: " + ok.error().message);

  VmSpec spec;
  spec.qemu_binary = config.qemu_binary().empty() ? "qemu-system-x86_64" : config.qemu_binary();
  spec.machine = image.machine().empty() ? "pc" : image.machine();
  spec.accel = accel == "kvm" ? Accel::kvm : Accel::tcg;
  spec.vcpus = image.vcpus() ? image.vcpus() : 1;
  spec.memory_mib = image.memory_mib() ? image.memory_mib() : 512;
  spec.seed_iso = dir / "seed.iso";
  spec.boot = image.boot_mode() == v1::BOOT_MODE_KERNEL ? VmBoot::kernel : VmBoot::disk;
  spec.kernel = image.kernel();
  spec.initrd = image.initrd();
  spec.kernel_append = image.kernel_append();
  spec.qmp_socket = dir / "qmp.sock";
  spec.console_log = dir / "console.log";
  spec.vmgenid = random_guid();
  spec.identity_socket = dir / "id.sock";
  if (!image.disk().empty()) {
    auto format = image.disk_format().empty() ? std::string{"raw"} : image.disk_format();
    if (auto ok = create_overlay("qemu-img", image.disk(), format, dir / "overlay.qcow2"); !ok)
      return tl::unexpected(ok.error());
    spec.disk = dir / "overlay.qcow2";
    spec.disk_format = "qcow2";
  }
  return spec;
}

Result<ChildProcess> start_qemu(VmSpec spec, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config, const fs::path& dir) {
  SpawnOptions options;
  options.capture_stdout = false;
  auto qemu_user = resolve_qemu_user(configured_qemu_user(config));
  if (!qemu_user)
    return tl::unexpected(qemu_user.error());
  if (*qemu_user) {
    VmFiles files{config.state_dir(), dir, spec.disk, spec.seed_iso, {},
                  {image.disk(), image.kernel(), image.initrd()}, {}};
    if (auto shared = share_vm_files(**qemu_user, files); !shared)
      return tl::unexpected(shared.error());
    options.run_as = (*qemu_user)->credentials;
  }
  int console_fd = ::open(spec.console_log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
  if (console_fd < 0)
    return fail(errno_message("cannot create " + spec.console_log.string(), errno));
  options.pass_fds = {console_fd};
  spec.console_fd = 3;
  auto child = ChildProcess::spawn(build_qemu_argv(spec), options);
  ::close(console_fd);
  return child;
}

std::string stderr_of(ChildProcess& child) {
  std::string out;
  char buf[4096];
  ssize_t n;
  while (child.stderr_fd() >= 0 && (n = ::read(child.stderr_fd(), buf, sizeof buf)) > 0)
    out.append(buf, static_cast<size_t>(n));
  while (!out.empty() && (out.back() == '\n' || out.back() == ' '))
    out.pop_back();
  return out;
}

// Stops the booted guest and writes its state to dir/state through a descriptor
// QEMU gets over QMP (its sandbox forbids spawning `exec:` helpers).
Result<void> save_state(QmpClient& qmp, const fs::path& dir) {
  if (auto stopped = qmp.execute("stop"); !stopped)
    return fail(stopped.error().message);
  int fd = ::open((dir / "state").c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    return fail(errno_message("cannot create " + (dir / "state").string(), errno));
  auto passed = qmp.execute("getfd", {{"fdname", "template-state"}}, 10s, fd);
  ::close(fd);
  if (!passed)
    return fail(passed.error().message);
  if (auto started = qmp.execute("migrate", {{"uri", "fd:template-state"}}); !started)
    return fail(started.error().message);
  const auto deadline = Clock::now() + 10min;
  while (Clock::now() < deadline) {
    auto status = qmp.execute("query-migrate");
    if (!status)
      return fail(status.error().message);
    auto state = status->value("status", std::string{});
    if (state == "completed")
      return {};
    if (state == "failed" || state == "cancelled")
      return fail("QEMU could not save the template's state: " +
                  status->value("error-desc", state));
    std::this_thread::sleep_for(20ms);
  }
  return fail("saving the template's state took more than 10 minutes");
}

// The guest's end of the SSH connection goes on after the runner hangs up (sshd's
// teardown, the PAM session's close): frozen before it is done, every clone would
// finish it in its first fraction of a second, beside its identity. So the state is
// saved once the guest is idle — QEMU used at most 15 % of a core for half a second
// (an idle guest's QEMU: 0-10 %) — or after 20 s in any case.
void wait_until_guest_idle(pid_t qemu) {
  IdleWatch watch(0.15, 500ms);
  const auto started = Clock::now();
  while (Clock::now() - started < 20s) {
    auto cpu = process_cpu_time(qemu);
    if (!cpu)
      return;  // QEMU is gone: saving the state says so
    if (watch.sample(Clock::now(), *cpu)) {
      spdlog::debug("template: the guest was idle {} ms after the SSH connection closed",
                    std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started).count());
      return;
    }
    std::this_thread::sleep_for(100ms);
  }
  spdlog::warn("template: the guest was still busy 20 s after the SSH connection closed; "
               "saving its state all the same (its clones finish that work when they start)");
}

// Whether clones can take their identity over the virtio-serial port: the agent
// is started in the guest and has said it is ready ("" then), or why not.
std::string start_identity_agent(SshSession& session, IdentityChannel& channel,
                                 std::chrono::seconds timeout) {
  std::string err;
  const auto agent = identity_agent_input();
  auto started = session.exec(
    identity_agent_command(identity_port_name),
    [&err](SshStream stream, std::string_view bytes) {
      if (stream == SshStream::err && err.size() < 300)
        err.append(bytes.substr(0, 300 - err.size()));
    },
    ExecOptions{timeout, nullptr, agent});
  while (!err.empty() && (err.back() == '\n' || err.back() == ' '))
    err.pop_back();
  if (!started)
    return "cannot start the identity agent: " + started.error().message;
  if (started->exit_code == identity_agent_no_port_exit)
    return "the guest has no virtio-serial port (virtio_console driver): " + err;
  if (started->exit_code != 0)
    return "cannot start the identity agent (exit code " + std::to_string(started->exit_code) +
           (err.empty() ? std::string{")"} : "): " + err);
  if (auto ready = await_identity_agent(channel, Clock::now() + timeout); !ready)
    return ready.error().message;
  return "";
}

// Boot, SSH, quiet, stop, save: the template's files end up in `dir`, what was
// learnt about its guest in `facts`.
Result<void> run_template_vm(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                             const TemplateKey& key, const std::string& accel, const fs::path& dir,
                             TemplateGuestFacts& facts) {
  SshTarget target;
  auto spec = make_template_files(image, config, key, accel, dir, target);
  if (!spec)
    return tl::unexpected(spec.error());
  auto child = start_qemu(*spec, image, config, dir);
  if (!child)
    return fail("cannot start QEMU: " + child.error().message);
  bool stopped = false;  // QEMU paused the guest (as it does on a KVM internal error)
  std::optional<QmpClient>* qmp_seen = nullptr;
  auto gone = [&] {
    if (qmp_seen && *qmp_seen)
      while (auto event = (*qmp_seen)->next_event(std::chrono::milliseconds(0)))
        stopped |= event->event == "STOP";
    return stopped || child->try_wait().has_value();
  };
  auto failed = [&](const std::string& what) {
    child->kill(SIGKILL);
    child->wait_for(5s);
    auto err = stderr_of(*child);
    return fail(what + (err.empty() ? "" : " (QEMU: " + err + ")") + file_tail(spec->console_log, 15));
  };
  auto connected = QmpClient::connect(spec->qmp_socket, 30s, gone);
  if (!connected)
    return failed("QMP: " + connected.error().message);
  std::optional<QmpClient> qmp_client(std::move(*connected));
  qmp_seen = &qmp_client;
  auto& qmp = qmp_client;
  auto usernet = qmp->human_command("info usernet");
  auto port = usernet ? parse_usernet_host_port(*usernet) : Result<uint16_t>(fail(usernet.error().message));
  if (!port)
    return failed("cannot learn the SSH port: " + port.error().message);
  target.port = *port;
  // Connected from now until the state is saved: the guest's agent sees the host
  // side open, and so does every clone (whose runner connects before `cont`).
  auto channel = IdentityChannel::connect(spec->identity_socket, Clock::now() + 10s);
  if (!channel)
    return failed(channel.error().message);
  auto boot_seconds = config.boot_timeout_seconds() ? config.boot_timeout_seconds() : 300;
  auto session = SshSession::wait_until_ready(
    target, Clock::now() + std::chrono::seconds(boot_seconds), 20ms, gone);
  if (!session)
    return failed(stopped ? "QEMU stopped the template's guest while it booted (a KVM that "
                            "cannot run it?)"
                          : "the template's guest did not get to SSH: " + session.error().message);
  std::string quiet_output;
  auto quiet = session->exec(
    template_quiet_command(),
    [&](SshStream stream, std::string_view bytes) {
      if (stream == SshStream::out && quiet_output.size() < 4096)
        quiet_output.append(bytes);
    },
    ExecOptions{std::chrono::seconds(boot_seconds), nullptr, {}});
  if (!quiet || quiet->exit_code != 0)
    return failed("cannot quiet the template's guest (sync)");
  facts.cloud_init_errors = quiet_output.find(template_cloud_init_errors_word) != std::string::npos;
  // Last: the agent must be waiting on its port when the state is saved.
  facts.identity_note = start_identity_agent(*session, *channel,
                                       std::chrono::seconds(std::min<uint32_t>(boot_seconds, 120)));
  session = fail("closed");  // the guest's SSH connection ends before it is frozen
  wait_until_guest_idle(child->pid());
  if (auto saved = save_state(*qmp, dir); !saved)
    return failed(saved.error().message);
  (void)qmp->execute("quit", nlohmann::json::object(), 5s);
  if (!child->wait_for(10s))
    child->kill(SIGKILL);
  channel->close();
  std::error_code ec;
  fs::remove(spec->qmp_socket, ec);
  fs::remove(spec->identity_socket, ec);
  return {};
}

}  // namespace

Result<TemplateInfo> build_template(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                    const TemplateKey& key, const std::string& accel) {
  TemplateStore store(config.state_dir());
  auto dir = store.make_build_dir(key.id);
  if (!dir)
    return tl::unexpected(dir.error());
  const auto started = Clock::now();
  TemplateGuestFacts facts;
  auto built = run_template_vm(image, config, key, accel, *dir, facts);
  facts.identity_agent = facts.identity_note.empty();
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - started).count();
  Result<TemplateInfo> published =
    built ? store.publish(*dir, key, image.label(), ms, facts)
          : tl::unexpected(built.error());
  if (!published) {
    std::error_code ec;
    fs::remove_all(*dir, ec);
    return fail("cannot build the template of image '" + image.label() + "': " +
                published.error().message);
  }
  return published;
}

namespace {

Result<EnsuredTemplate> ensure_on(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                  const std::string& accel,
                                  const std::function<void(const TemplateKey&)>& on_build,
                                  bool retry_failed) {
  auto key = template_key_for(image, config, accel);
  if (!key)
    return tl::unexpected(key.error());
  TemplateStore store(config.state_dir());
  EnsuredTemplate out;
  if (auto ready = store.find_ready(key->id)) {
    out.info = *ready;
  } else {
    // One build at a time: whoever waited here finds the template the other built.
    auto lock = TemplateLock::acquire(config.state_dir(), key->id);
    if (!lock)
      return tl::unexpected(lock.error());
    if (auto ready = store.find_ready(key->id)) {
      out.info = *ready;
    } else {
      if (!retry_failed)
        if (auto failed = store.recent_failed_build(key->id, failed_build_pause_us))
          return fail("no template for image '" + image.label() + "': " + *failed);
      if (on_build)
        on_build(*key);
      auto built = build_template(image, config, *key, accel);
      if (!built) {
        (void)store.note_failed_build(key->id, built.error().message);
        return tl::unexpected(built.error());
      }
      out.info = *built;
      out.built = true;
    }
  }
  auto restore = store.restore_spec(key->id);
  if (!restore)
    return tl::unexpected(restore.error());
  out.restore = *restore;
  return out;
}

}  // namespace

Result<std::optional<v1::RestoreFrom>> find_template(const v1::ImageSpec& image,
                                                     const v1::RunnerConfig& config,
                                                     const std::string& accel) {
  TemplateStore store(config.state_dir());
  auto key = template_key_for(image, config, accel);
  if (!key)
    return tl::unexpected(key.error());
  if (!store.find_ready(key->id)) {
    const bool automatic = config.accel().empty() || config.accel() == "auto";
    // The KVM template could not be built lately: "auto" uses the TCG one.
    if (accel == "kvm" && automatic) {
      if (auto failed = store.recent_failed_build(key->id, failed_build_pause_us)) {
        auto on_tcg = find_template(image, config, "tcg");
        if (on_tcg && *on_tcg)
          (*on_tcg)->set_kvm_unusable_reason("the KVM template: " + *failed);
        return on_tcg;
      }
    }
    return std::optional<v1::RestoreFrom>{};
  }
  auto from = store.restore_spec(key->id);
  if (!from)
    return tl::unexpected(from.error());
  return std::optional<v1::RestoreFrom>{*from};
}

Result<EnsuredTemplate> ensure_template(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                        const std::string& accel,
                                        const std::function<void(const TemplateKey&)>& on_build,
                                        bool retry_failed) {
  auto ensured = ensure_on(image, config, accel, on_build, retry_failed);
  // accel "auto" chose KVM, and KVM could not run the template's guest (now, or at
  // the build before): the template is made and restored on TCG, as a cold boot
  // would fall back to TCG.
  const bool automatic = config.accel().empty() || config.accel() == "auto";
  if (ensured || accel != "kvm" || !automatic)
    return ensured;
  auto on_tcg = ensure_on(image, config, "tcg", on_build, retry_failed);
  if (!on_tcg)
    return fail(ensured.error().message + "; on TCG: " + on_tcg.error().message);
  on_tcg->restore.set_kvm_unusable_reason(ensured.error().message);
  return on_tcg;
}

}  // namespace solstice
