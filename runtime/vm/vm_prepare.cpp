// Everything a VM needs before QEMU starts, cold or restored: its work directory,
// keys, overlay, seed and uploads ISO. About 500 lines: each part is short, and
// they all fill the one VmHandle in order.
#include "runtime/vm/vm_prepare.hpp"

#include <sys/stat.h>
#include <sys/un.h>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <fstream>
#include <chrono>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/child_process.hpp"
#include "runtime/ssh/ssh_keys.hpp"
#include "runtime/vm/cloud_init.hpp"
#include "runtime/vm/iso9660.hpp"
#include "runtime/job/guest_commands.hpp"

namespace solstice {

namespace fs = std::filesystem;

fs::path job_dir_for(const v1::RunnerConfig& config, const std::string& job_id) {
  return fs::path(config.state_dir()) / "jobs" / job_id;
}

fs::path work_dir_for(const v1::RunnerConfig& config, const std::string& job_id) {
  return fs::path(config.state_dir()) / "run" / job_id;
}

fs::path console_record_path(const v1::VmHandle& handle) {
  return handle.job_dir().empty() ? fs::path() : fs::path(handle.job_dir()) / "console.log";
}

Result<void> make_missing_dirs(const fs::path& dir) {
  std::error_code ec;
  fs::path partial;
  for (const auto& part : dir) {
    partial /= part;
    if (fs::is_directory(partial, ec))
      continue;
    // Directories above `dir` get search permission for others, never read: QEMU's
    // user must pass through them to its work directory (a state dir the runner
    // makes under a new /tmp/x would otherwise be unreachable), and nobody can list them.
    const mode_t mode = partial == dir ? 0700 : 0701;
    if (::mkdir(partial.c_str(), mode) != 0 && errno != EEXIST)
      return fail(errno_message("cannot create directory " + partial.string(), errno));
  }
  return {};
}

Result<void> make_private_dir(const fs::path& dir) {
  if (auto made = make_missing_dirs(dir); !made)
    return made;
  // The last component must be private even if it existed already.
  if (::chmod(dir.c_str(), 0700) != 0)
    return fail(errno_message("cannot set mode 0700 on " + dir.string(), errno));
  return {};
}

std::string resolve_accel(const std::string& configured, const std::string& kvm_device) {
  if (configured == "kvm" || configured == "tcg")
    return configured;
  // "auto": KVM when the device is usable. A KVM that cannot run a guest is
  // detected at boot by the VM attempt; the job supervisor then retries on TCG.
  const auto& device = kvm_device.empty() ? std::string{"/dev/kvm"} : kvm_device;
  return ::access(device.c_str(), R_OK | W_OK) == 0 ? "kvm" : "tcg";
}

// A valid hostname from any job id: letters and digits kept, the rest as '-'.
std::string guest_hostname(const std::string& job_id) {
  std::string name = "solstice-";
  for (char c : job_id) {
    if (name.size() >= 40)
      break;
    name += std::isalnum(static_cast<unsigned char>(c)) ? static_cast<char>(std::tolower(c)) : '-';
  }
  while (name.back() == '-')
    name.pop_back();
  return name;
}

namespace {

struct ToolRun {
  ExitStatus status;
  std::string out;
  std::string err;
};

// Runs `argv` to its end, reading its stdout and stderr while it runs (a full pipe
// would stall it), keeping at most 1 MiB of each. A child still running at the
// deadline is killed (by ~ChildProcess) and the error says so.
Result<ToolRun> run_to_end(const std::vector<std::string>& argv, std::chrono::milliseconds timeout) {
  using clock = std::chrono::steady_clock;
  constexpr size_t kept_bytes = 1u << 20;
  const auto deadline = clock::now() + timeout;
  auto child = ChildProcess::spawn(argv);
  if (!child)
    return fail(child.error().message);
  ToolRun run;
  const int fds[2] = {child->stdout_fd(), child->stderr_fd()};
  std::string* kept[2] = {&run.out, &run.err};
  bool open[2] = {fds[0] >= 0, fds[1] >= 0};
  const auto timed_out = [&] {
    return fail(argv[0] + " did not finish within " +
                std::to_string(std::chrono::duration_cast<std::chrono::seconds>(timeout).count()) +
                " s");
  };
  while (open[0] || open[1]) {
    auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
    if (remaining.count() <= 0)
      return timed_out();
    pollfd polls[2];
    int watched[2];
    nfds_t count = 0;
    for (int i = 0; i < 2; ++i) {
      if (open[i]) {
        polls[count] = pollfd{fds[i], POLLIN, 0};
        watched[count++] = i;
      }
    }
    if (::poll(polls, count, static_cast<int>(remaining.count()) + 1) < 0 && errno != EINTR)
      return fail(errno_message("cannot wait for " + argv[0], errno));
    for (nfds_t p = 0; p < count; ++p) {
      if (polls[p].revents == 0)
        continue;
      const int i = watched[p];
      char buf[4096];
      for (;;) {
        ssize_t n = ::read(fds[i], buf, sizeof buf);
        if (n > 0) {
          const size_t room = kept_bytes - std::min(kept_bytes, kept[i]->size());
          kept[i]->append(buf, std::min(static_cast<size_t>(n), room));
          continue;
        }
        if (n < 0 && errno == EINTR)
          continue;
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
          open[i] = false;  // end of output (or an unreadable pipe: stop reading it)
        break;
      }
    }
  }
  auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
  auto status = child->wait_for(std::max(remaining, std::chrono::milliseconds(0)));
  if (!status)
    return timed_out();
  run.status = *status;
  return run;
}

// A tool's stderr for a message: "qemu-img: " prefixes dropped, lines joined with
// "; ", at most 1000 characters.
std::string stderr_text(const std::string& err) {
  std::string text;
  size_t start = 0;
  while (start < err.size()) {
    size_t end = err.find('\n', start);
    if (end == std::string::npos)
      end = err.size();
    std::string line = err.substr(start, end - start);
    start = end + 1;
    if (line.rfind("qemu-img: ", 0) == 0)
      line.erase(0, 10);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back())))
      line.pop_back();
    if (!line.empty())
      text += (text.empty() ? "" : "; ") + line;
  }
  if (text.size() > 1000)
    text = text.substr(0, 1000) + "...";
  return text;
}

std::string quoted(const std::string& text) {
  return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// object[key] when it is a string, else "" (qemu-img's output is not trusted blindly).
std::string string_field(const nlohmann::json& object, const char* key) {
  auto found = object.find(key);
  return found != object.end() && found->is_string() ? found->get<std::string>() : std::string();
}

// Whether one image of `qemu-img info --output=json` says QEMU marked it corrupt.
bool marked_corrupt(const nlohmann::json& image) {
  auto specific = image.find("format-specific");
  if (specific == image.end() || !specific->is_object())
    return false;
  auto data = specific->find("data");
  if (data == specific->end() || !data->is_object())
    return false;
  auto corrupt = data->find("corrupt");
  return corrupt != data->end() && corrupt->is_boolean() && corrupt->get<bool>();
}

}  // namespace

Result<void> create_overlay(const std::string& qemu_img, const fs::path& base,
                            const std::string& base_format, const fs::path& overlay) {
  auto run = run_to_end({qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b",
                         fs::absolute(base).string(), overlay.string()},
                        std::chrono::seconds(60));
  if (!run)
    return fail("cannot create the disk overlay " + overlay.string() + ": " + run.error().message);
  if (run->status.signaled || run->status.code != 0)
    return fail("qemu-img create failed for base image " + base.string() + " (" +
                run->status.describe() + "): " + stderr_text(run->err));
  return {};
}

namespace {

Result<void> copy_uefi_vars(const fs::path& to) {
  std::error_code ec;
  fs::copy_file(ovmf_vars_path, to, fs::copy_options::overwrite_existing, ec);
  if (ec)
    return fail("cannot copy the UEFI variables store " + std::string(ovmf_vars_path) + " to " + to.string() +
                ": " + ec.message() + " (firmware \"uefi\" needs Debian's ovmf package)");
  fs::permissions(to, fs::perms::owner_read | fs::perms::owner_write, ec);
  return {};
}

// The job's uploads on an ISO in the work directory when they hold enough bytes
// (uploads_iso_min_bytes in all). Otherwise they go over SFTP as before: also
// when a source is not a readable regular file (the SFTP upload then names it)
// and when the ISO cannot be written (uploads_iso_note says why). Sources are
// copied into the ISO as it is written, never held in memory.
void prepare_uploads_iso(const v1::JobSpec& job, const fs::path& work_dir, v1::VmHandle& h) {
  std::vector<IsoFile> files;
  uint64_t total = 0;
  for (int i = 0; i < job.uploads_size(); ++i) {
    const auto& upload = job.uploads(i);
    IsoFile file;
    file.name = uploads_iso_file_name(i);
    if (upload.has_content()) {
      file.content = upload.content();
    } else {
      struct stat info {};
      if (::stat(upload.source().c_str(), &info) != 0 || !S_ISREG(info.st_mode) ||
          ::access(upload.source().c_str(), R_OK) != 0)
        return;
      file.source = upload.source();
      file.source_size = static_cast<uint64_t>(info.st_size);
    }
    total += file.size();
    files.push_back(std::move(file));
  }
  if (files.empty() || total < uploads_iso_min_bytes)
    return;
  auto iso = work_dir / "uploads.iso";
  std::error_code ignored;
  fs::remove(iso, ignored);  // none, unless an earlier attempt's survived
  if (auto ok = write_iso9660(iso, uploads_iso_label, files); !ok) {
    h.set_uploads_iso_note("cannot put the uploads on an ISO (" + ok.error().message + "): they go over SFTP");
    return;
  }
  h.set_uploads_iso(iso.string());
}

// A clone of a template: a new overlay on top of the template's frozen one, the
// template's seed CD-ROM (the device must be as it was), the migration stream to
// load, a new vmgenid GUID, and the template's key and host key for the first
// connection (the job's set-up then installs this handle's own).
Result<v1::VmHandle> prepare_restore(v1::VmHandle h, const v1::ImageSpec& image,
                                     const fs::path& work_dir, const std::string& host_key_private) {
  const auto& from = image.restore_from();
  h.set_seed_iso(from.seed_iso());
  h.set_incoming_state(from.state_file());
  h.set_boot_private_key(from.template_private_key());
  h.set_boot_host_key(from.template_host_key());
  h.set_template_id(from.template_id());
  h.set_host_key_private(host_key_private);
  h.set_vmgenid(random_guid());
  // The template's virtio-serial identity port is part of its device set: every
  // clone has it (whether its guest runs the agent or not).
  auto identity_socket = work_dir / "id.sock";
  if (identity_socket.string().size() >= sizeof(sockaddr_un{}.sun_path))
    return fail("identity socket path " + identity_socket.string() +
                " is too long for a unix socket: choose a shorter state_dir");
  h.set_identity_socket(identity_socket.string());
  h.set_identity_agent(from.identity_agent());
  if (!from.frozen_overlay().empty()) {
    auto overlay = work_dir / "overlay.qcow2";
    if (auto ok = create_overlay("qemu-img", from.frozen_overlay(), "qcow2", overlay); !ok)
      return tl::unexpected(ok.error());
    h.set_disk(overlay.string());
    h.set_disk_format("qcow2");
  }
  return h;
}

Result<v1::VmHandle> prepare_in(const v1::JobSpec& job, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config, const fs::path& work_dir,
                                const fs::path& job_dir, uint32_t attempt) {
  v1::VmHandle h;
  h.set_job_id(job.id());
  h.set_work_dir(work_dir.string());
  h.set_job_dir(job_dir.string());
  h.set_qemu_binary(config.qemu_binary().empty() ? "qemu-system-x86_64" : config.qemu_binary());
  h.set_machine(image.machine().empty() ? "pc" : image.machine());
  h.set_accel(resolve_accel(config.accel(), config.kvm_device()));
  h.set_vcpus(image.vcpus() ? image.vcpus() : 1);
  h.set_memory_mib(image.memory_mib() ? image.memory_mib() : 512);
  h.set_boot_mode(image.boot_mode());
  h.set_kernel(image.kernel());
  h.set_initrd(image.initrd());
  h.set_kernel_append(image.kernel_append());
  h.set_user(image.user().empty() ? "runner" : image.user());
  // QEMU's raw capture holds secrets in clear: it lives and dies with the VM. The
  // record's console.log is written from it, redacted, by the console tailer.
  h.set_console_log((work_dir / "console.raw").string());

  // Each boot attempt has a socket name of its own: a client of a retired
  // attempt's QEMU can never reach the next attempt's.
  auto qmp = work_dir / ("qmp-" + std::to_string(attempt) + ".sock");
  if (qmp.string().size() >= sizeof(sockaddr_un{}.sun_path))
    return fail("QMP socket path " + qmp.string() + " is too long for a unix socket (" +
                std::to_string(qmp.string().size()) + " bytes): choose a shorter state_dir");
  h.set_qmp_socket(qmp.string());

  // QEMU appends to a console capture we create private (it keeps the mode); the
  // record exists from the start (a later boot attempt appends to it).
  for (const auto& [path, truncate] : {std::pair{h.console_log(), true},
                                       std::pair{console_record_path(h).string(), false}}) {
    int console_fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW |
                                            (truncate ? O_TRUNC : 0), 0600);
    if (console_fd < 0)
      return fail(errno_message("cannot create " + path, errno));
    ::close(console_fd);
  }

  auto user_key = generate_ed25519("solstice-job");
  if (!user_key)
    return fail("cannot generate the job's SSH key: " + user_key.error().message);
  auto host_key = generate_ed25519("solstice-host");
  if (!host_key)
    return fail("cannot generate the guest's host key: " + host_key.error().message);
  h.set_private_key(user_key->private_openssh);
  h.set_public_key(user_key->public_line);
  h.set_host_key(host_key->public_blob);
  h.set_host_key_public(host_key->public_line);

  prepare_uploads_iso(job, work_dir, h);
  if (image.has_restore_from())
    return prepare_restore(h, image, work_dir, host_key->private_openssh);

  SeedSpec seed;
  seed.instance_id = "solstice-" + job.id();
  seed.hostname = guest_hostname(job.id());
  seed.user = h.user();
  seed.authorized_key = user_key->public_line;
  seed.host_key_private = host_key->private_openssh;
  seed.host_key_public = host_key->public_line;
  seed.extra_user_data = job.user_data();
  auto seed_iso = work_dir / "seed.iso";
  if (auto ok = write_seed_iso(seed, seed_iso); !ok)
    return fail("cannot write the cloud-init seed: " + ok.error().message);
  h.set_seed_iso(seed_iso.string());

  if (image.firmware() == "uefi") {
    // OVMF writes its variables (boot entries): each VM gets a copy of the template.
    auto vars = work_dir / "uefi-vars.fd";
    if (auto ok = copy_uefi_vars(vars); !ok)
      return tl::unexpected(ok.error());
    h.set_firmware_code(ovmf_code_path);
    h.set_firmware_vars(vars.string());
  }
  if (!image.disk().empty()) {
    auto format = image.disk_format().empty() ? std::string{"raw"} : image.disk_format();
    auto overlay = work_dir / "overlay.qcow2";
    if (auto ok = create_overlay("qemu-img", image.disk(), format, overlay); !ok)
      return tl::unexpected(ok.error());
    h.set_disk(overlay.string());
    h.set_disk_format("qcow2");
  }
  return h;
}

}  // namespace

std::string random_guid() {
  unsigned char b[16];
  std::ifstream random("/dev/urandom", std::ios::binary);
  random.read(reinterpret_cast<char*>(b), sizeof b);
  b[6] = static_cast<unsigned char>((b[6] & 0x0f) | 0x40);  // version 4
  b[8] = static_cast<unsigned char>((b[8] & 0x3f) | 0x80);  // RFC 4122 variant
  static const char digits[] = "0123456789abcdef";
  std::string text;
  for (int i = 0; i < 16; ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10)
      text += '-';
    text += digits[b[i] >> 4];
    text += digits[b[i] & 0xf];
  }
  return text;
}

Result<void> check_disk_image(const fs::path& disk, const std::string& format,
                              const std::string& what) {
  const std::string shown = what + " " + quoted(disk.string());
  // -U: no lock, so VMs of other jobs using the image as their base do not matter;
  // --backing-chain: a qcow2 whose backing file is gone cannot be used either.
  auto run = run_to_end({"qemu-img", "info", "-U", "--backing-chain", "--output=json",
                         fs::absolute(disk).string()},
                        std::chrono::seconds(10));
  if (!run)
    return fail(shown + ": cannot check it with qemu-img info: " + run.error().message);
  if (run->status.signaled || run->status.code != 0) {
    auto why = stderr_text(run->err);
    return fail(shown + ": QEMU cannot open it: " +
                (why.empty() ? "qemu-img info ended with " + run->status.describe() : why));
  }
  auto chain = nlohmann::json::parse(run->out, nullptr, false);
  if (chain.is_object())
    chain = nlohmann::json::array({chain});
  if (!chain.is_array() || chain.empty() || !chain[0].is_object())
    return fail(shown + ": qemu-img info answered something that is not its JSON description");
  // An empty format is used as raw when the VM is prepared.
  const std::string expected = format.empty() ? std::string("raw") : format;
  const std::string reported = string_field(chain[0], "format");
  if (reported != expected)
    return fail(shown + ": QEMU reads it as a " + quoted(reported) + " image, but it would be used as " +
                quoted(expected) + " (the runner takes qcow2 or raw images; qemu-img convert -O qcow2 "
                "makes one)");
  for (size_t i = 0; i < chain.size(); ++i) {
    if (!chain[i].is_object() || !marked_corrupt(chain[i]))
      continue;
    const std::string which =
      i == 0 ? std::string("the image") : "its backing file " + quoted(string_field(chain[i], "filename"));
    return fail(shown + ": " + which + " is marked corrupt by QEMU (qemu-img check -r all repairs it)");
  }
  return {};
}

Result<v1::VmHandle> prepare_vm(const v1::JobSpec& job, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config, uint32_t attempt) {
  if (job.id().empty())
    return fail("internal: a job id is needed to prepare a VM");
  if (image.boot_mode() == v1::BOOT_MODE_KERNEL ? image.kernel().empty() : image.disk().empty())
    return fail("image '" + image.label() + "' names no " +
                (image.boot_mode() == v1::BOOT_MODE_KERNEL ? "kernel" : "disk"));
  auto job_dir = job_dir_for(config, job.id());
  auto work_dir = work_dir_for(config, job.id());
  if (auto ok = make_private_dir(job_dir); !ok)
    return tl::unexpected(ok.error());
  if (auto ok = make_private_dir(work_dir); !ok)
    return tl::unexpected(ok.error());
  auto handle = prepare_in(job, image, config, work_dir, job_dir, attempt);
  if (!handle) {
    std::error_code ec;
    fs::remove_all(work_dir, ec);
  }
  return handle;
}

VmSpec vm_spec_from_handle(const v1::VmHandle& h) {
  VmSpec spec;
  spec.qemu_binary = h.qemu_binary();
  spec.machine = h.machine();
  spec.accel = h.accel() == "kvm" ? Accel::kvm : Accel::tcg;
  spec.vcpus = h.vcpus();
  spec.memory_mib = h.memory_mib();
  spec.disk = h.disk();
  spec.disk_format = h.disk_format();
  spec.snapshot = h.snapshot();
  spec.seed_iso = h.seed_iso();
  // A clone's drive starts empty, as its template's did; the medium goes in later.
  if (h.incoming_state().empty())
    spec.uploads_iso = h.uploads_iso();
  spec.boot = h.boot_mode() == v1::BOOT_MODE_KERNEL ? VmBoot::kernel : VmBoot::disk;
  spec.kernel = h.kernel();
  spec.initrd = h.initrd();
  spec.kernel_append = h.kernel_append();
  spec.qmp_socket = h.qmp_socket();
  spec.console_log = h.console_log();
  spec.firmware_code = h.firmware_code();
  spec.firmware_vars = h.firmware_vars();
  spec.vmgenid = h.vmgenid();
  spec.incoming_defer = !h.incoming_state().empty();
  spec.identity_socket = h.identity_socket();
  return spec;
}

Result<void> cleanup_vm(const v1::VmHandle& handle) {
  if (handle.work_dir().empty())
    return {};
  std::error_code ec;
  fs::remove_all(handle.work_dir(), ec);
  if (ec)
    return fail("cannot remove " + handle.work_dir() + ": " + ec.message());
  return {};
}

}  // namespace solstice
