#include "runtime/vm_prepare.hpp"

#include <sys/stat.h>
#include <sys/un.h>

#include <fcntl.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <system_error>

#include "runtime/child_process.hpp"
#include "runtime/cloud_init.hpp"
#include "runtime/ssh_keys.hpp"

namespace solstice {

namespace fs = std::filesystem;

fs::path job_dir_for(const v1::RunnerConfig& config, const std::string& job_id) {
  return fs::path(config.state_dir()) / "jobs" / job_id;
}

fs::path work_dir_for(const v1::RunnerConfig& config, const std::string& job_id) {
  return fs::path(config.state_dir()) / "run" / job_id;
}

Result<void> make_private_dir(const fs::path& dir) {
  std::error_code ec;
  fs::path partial;
  for (const auto& part : dir) {
    partial /= part;
    if (fs::is_directory(partial, ec))
      continue;
    if (::mkdir(partial.c_str(), 0700) != 0 && errno != EEXIST)
      return fail(errno_message("cannot create directory " + partial.string(), errno));
  }
  // The last component must be private even if it existed already.
  if (::chmod(dir.c_str(), 0700) != 0)
    return fail(errno_message("cannot set mode 0700 on " + dir.string(), errno));
  return {};
}

std::string resolve_accel(const std::string& configured) {
  if (configured == "kvm" || configured == "tcg")
    return configured;
  // "auto": KVM when the device is usable. A KVM that cannot run a guest is
  // detected at boot by the job supervisor, which retries on TCG.
  return ::access("/dev/kvm", R_OK | W_OK) == 0 ? "kvm" : "tcg";
}

namespace {

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

Result<void> create_overlay(const std::string& qemu_img, const fs::path& base,
                            const std::string& base_format, const fs::path& overlay) {
  auto child = ChildProcess::spawn({qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format,
                                    "-b", fs::absolute(base).string(), overlay.string()});
  if (!child)
    return fail("cannot create the disk overlay: " + child.error().message);
  auto status = child->wait_for(std::chrono::seconds(60));
  if (!status)
    return fail("qemu-img did not finish within 60 s creating " + overlay.string());
  if (status->signaled || status->code != 0) {
    std::string err;
    char buf[4096];
    ssize_t n;
    while (child->stderr_fd() >= 0 && (n = ::read(child->stderr_fd(), buf, sizeof buf)) > 0)
      err.append(buf, static_cast<size_t>(n));
    while (!err.empty() && (err.back() == '\n' || err.back() == ' '))
      err.pop_back();
    return fail("qemu-img create failed for base image " + base.string() + " (" +
                status->describe() + "): " + err);
  }
  return {};
}

Result<v1::VmHandle> prepare_in(const v1::JobSpec& job, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config, const fs::path& work_dir,
                                const fs::path& job_dir) {
  v1::VmHandle h;
  h.set_job_id(job.id());
  h.set_work_dir(work_dir.string());
  h.set_job_dir(job_dir.string());
  h.set_qemu_binary(config.qemu_binary().empty() ? "qemu-system-x86_64" : config.qemu_binary());
  h.set_machine(image.machine().empty() ? "pc" : image.machine());
  h.set_accel(resolve_accel(config.accel()));
  h.set_vcpus(image.vcpus() ? image.vcpus() : 1);
  h.set_memory_mib(image.memory_mib() ? image.memory_mib() : 512);
  h.set_boot_mode(image.boot_mode());
  h.set_kernel(image.kernel());
  h.set_initrd(image.initrd());
  h.set_kernel_append(image.kernel_append());
  h.set_user(image.user().empty() ? "runner" : image.user());
  h.set_console_log((job_dir / "console.log").string());

  auto qmp = work_dir / "qmp.sock";
  if (qmp.string().size() >= sizeof(sockaddr_un{}.sun_path))
    return fail("QMP socket path " + qmp.string() + " is too long for a unix socket (" +
                std::to_string(qmp.string().size()) + " bytes): choose a shorter state_dir");
  h.set_qmp_socket(qmp.string());

  // QEMU appends to a console log we create private (it keeps the mode).
  int console_fd = ::open(h.console_log().c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (console_fd < 0)
    return fail(errno_message("cannot create " + h.console_log(), errno));
  ::close(console_fd);

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

Result<v1::VmHandle> prepare_vm(const v1::JobSpec& job, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config) {
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
  auto handle = prepare_in(job, image, config, work_dir, job_dir);
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
  spec.boot = h.boot_mode() == v1::BOOT_MODE_KERNEL ? VmBoot::kernel : VmBoot::disk;
  spec.kernel = h.kernel();
  spec.initrd = h.initrd();
  spec.kernel_append = h.kernel_append();
  spec.qmp_socket = h.qmp_socket();
  spec.console_log = h.console_log();
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
