#pragma once
// The QEMU command line for one job's VM.
#include <filesystem>
#include <string>
#include <vector>

namespace solstice {

enum class Accel { kvm, tcg };
enum class VmBoot { disk, kernel };

struct VmSpec {
  std::string qemu_binary = "qemu-system-x86_64";
  std::string machine = "pc";  // i440fx: its IDE CD-ROM works with every kernel
  Accel accel = Accel::tcg;
  std::string cpu;             // empty: "host" on kvm, "max" on tcg
  unsigned vcpus = 1;
  unsigned memory_mib = 512;
  std::filesystem::path disk;  // overlay (qcow2) or, with snapshot, the base image
  std::string disk_format = "qcow2";
  bool snapshot = false;       // QEMU's snapshot=on instead of an overlay file
  std::filesystem::path seed_iso;  // attached as IDE CD-ROM when set
  // The job's uploads ISO (README "Uploads"), in the CD-ROM drive every VM has for
  // it from the start; empty: the drive is empty (a restored clone gets the medium
  // by QMP blockdev-change-medium, since its device set must be its template's).
  std::filesystem::path uploads_iso;
  VmBoot boot = VmBoot::disk;
  std::filesystem::path kernel, initrd;
  std::string kernel_append;
  std::filesystem::path qmp_socket;   // QMP server socket (unix)
  std::filesystem::path console_log;  // serial console written to this file
  // When >= 0: the descriptor number, in QEMU, of console_log opened for writing by
  // the runner; QEMU then writes through it and never opens the path (see -add-fd).
  int console_fd = -1;
  unsigned guest_ssh_port = 22;
  // UEFI: OVMF's code as read-only pflash and the VM's own variables store as
  // writable pflash. Both empty: the machine's BIOS (SeaBIOS).
  std::filesystem::path firmware_code, firmware_vars;
  // QEMU's vmgenid device with this GUID (a new one per restored clone tells a guest
  // kernel with the driver to reseed its RNG); empty: no device.
  std::string vmgenid;
  // Start paused, waiting for QMP migrate-incoming (`-incoming defer`): a restore.
  bool incoming_defer = false;
  // When set: a virtio-serial port named identity_port_name whose host side is a
  // socket QEMU listens on here (templates and their clones; the device set must
  // be the same on both sides of a migration).
  std::filesystem::path identity_socket;
};

// The qdev id of that drive (QMP blockdev-change-medium "id") and the volume label
// the guest finds it by.
inline constexpr const char* uploads_drive_id = "uploads";
inline constexpr const char* uploads_iso_label = "SOLSTICEUPLOADS";

// The guest's name of the identity port (/sys/class/virtio-ports/*/name).
inline constexpr const char* identity_port_name = "org.solstice.identity";

// QEMU's seccomp filter: no obsolete system calls, no set*uid/gid, no fork/exec, no
// scheduler or resource changes. QEMU dies (SIGSYS) on a denied call.
inline constexpr const char* qemu_sandbox_option =
  "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

// -nodefaults -no-user-config -display none, no -daemonize, -sandbox (above); virtio disk, seed on
// IDE CD-ROM, -netdev user with hostfwd=tcp:127.0.0.1:0-:22 (QEMU picks the port;
// read it back through QMP `info usernet`).
std::vector<std::string> build_qemu_argv(const VmSpec& spec);

}  // namespace solstice
