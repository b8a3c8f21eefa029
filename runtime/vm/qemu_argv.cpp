#include "runtime/vm/qemu_argv.hpp"

namespace solstice {

namespace {

// QEMU's option parser splits on ',' and reads ",," as a literal comma.
std::string escape_option_value(const std::string& value) {
  std::string escaped;
  escaped.reserve(value.size());
  for (char c : value) {
    escaped += c;
    if (c == ',') escaped += ',';
  }
  return escaped;
}

void add(std::vector<std::string>& argv, std::string option, std::string value) {
  argv.push_back(std::move(option));
  argv.push_back(std::move(value));
}

}  // namespace

std::vector<std::string> build_qemu_argv(const VmSpec& spec) {
  std::vector<std::string> argv{spec.qemu_binary, "-nodefaults", "-no-user-config", "-display", "none"};
  // A CI VM is single-use: a guest that reboots (or triple-faults) should end the
  // VM, not boot again silently. With -no-reboot QEMU exits on reset and the runner
  // sees the exit (and a SHUTDOWN event with reason "guest-reset").
  argv.push_back("-no-reboot");
  // A guest that escapes into QEMU meets the seccomp filter first.
  add(argv, "-sandbox", qemu_sandbox_option);

  add(argv, "-machine", spec.machine);
  const bool kvm = spec.accel == Accel::kvm;
  add(argv, "-accel", kvm ? "kvm" : "tcg");
  add(argv, "-cpu", !spec.cpu.empty() ? spec.cpu : (kvm ? "host" : "max"));
  add(argv, "-smp", std::to_string(spec.vcpus));
  add(argv, "-m", std::to_string(spec.memory_mib));

  if (!spec.firmware_code.empty()) {
    add(argv, "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=" + escape_option_value(spec.firmware_code.string()));
    add(argv, "-drive", "if=pflash,format=raw,unit=1,file=" + escape_option_value(spec.firmware_vars.string()));
  }
  if (!spec.disk.empty()) {
    std::string drive = "file=" + escape_option_value(spec.disk.string()) +
                        ",if=virtio,format=" + escape_option_value(spec.disk_format);
    if (spec.snapshot) drive += ",snapshot=on";
    add(argv, "-drive", drive);
  }
  if (!spec.seed_iso.empty()) {
    add(argv, "-drive",
        "file=" + escape_option_value(spec.seed_iso.string()) +
            ",if=ide,media=cdrom,readonly=on,format=raw");
  }

  // The uploads drive, on the secondary IDE channel (the seed takes the first), in
  // every VM: templates and their clones need the same devices.
  add(argv, "-drive",
      "if=none,id=uploads-medium,readonly=on" +
          (spec.uploads_iso.empty() ? std::string{}
                                    : ",format=raw,file=" + escape_option_value(spec.uploads_iso.string())));
  add(argv, "-device", std::string{"ide-cd,drive=uploads-medium,bus=ide.1,unit=0,id="} + uploads_drive_id);

  // Host side bound to 127.0.0.1 only, port 0: QEMU picks a free port, read back
  // through QMP `info usernet`.
  add(argv, "-netdev",
      "user,id=net0,hostfwd=tcp:127.0.0.1:0-:" + std::to_string(spec.guest_ssh_port));
  add(argv, "-device", "virtio-net-pci,netdev=net0");

  if (spec.console_fd >= 0) {
    // The runner's descriptor as fd set 1: QEMU needs no access to the job's record.
    add(argv, "-add-fd", "fd=" + std::to_string(spec.console_fd) + ",set=1,opaque=console");
    add(argv, "-chardev", "file,id=console0,path=/dev/fdset/1");
    add(argv, "-serial", "chardev:console0");
  } else if (!spec.console_log.empty()) {
    add(argv, "-chardev", "file,id=console0,path=" + escape_option_value(spec.console_log.string()));
    add(argv, "-serial", "chardev:console0");
  }
  if (!spec.qmp_socket.empty()) {
    add(argv, "-chardev",
        "socket,id=qmp0,path=" + escape_option_value(spec.qmp_socket.string()) +
            ",server=on,wait=off");
    add(argv, "-mon", "chardev=qmp0,mode=control");
  }

  if (!spec.identity_socket.empty()) {
    add(argv, "-chardev",
        "socket,id=identity0,path=" + escape_option_value(spec.identity_socket.string()) +
            ",server=on,wait=off");
    add(argv, "-device", "virtio-serial-pci,id=vserial0");
    add(argv, "-device",
        std::string{"virtserialport,bus=vserial0.0,chardev=identity0,name="} + identity_port_name);
  }
  if (!spec.vmgenid.empty())
    add(argv, "-device", "vmgenid,guid=" + spec.vmgenid);
  if (spec.incoming_defer)
    add(argv, "-incoming", "defer");

  if (spec.boot == VmBoot::kernel) {
    // Plain arguments, not option lists: no comma escaping here.
    add(argv, "-kernel", spec.kernel.string());
    if (!spec.initrd.empty()) add(argv, "-initrd", spec.initrd.string());
    if (!spec.kernel_append.empty()) add(argv, "-append", spec.kernel_append);
  }
  return argv;
}

}  // namespace solstice
