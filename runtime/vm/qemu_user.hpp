#pragma once
// The unprivileged user QEMU runs as when the runner is root (config key qemu_user).
//
// Why the runner drops privileges itself, in the child before exec, and not with
// QEMU's -runas: QEMU 7.2 switches user late, after it has installed its seccomp
// filter, and `-sandbox ...,elevateprivileges=deny` kills it (SIGSYS) at that setuid.
// (libvirt does the same for the same reason.) So QEMU starts as the user and opens
// everything as the user: the VM's work directory is shared with the user's group,
// the console capture is passed as an open descriptor, and the base image, kernel and
// initrd must be readable by the user. /dev/kvm needs the user in its group (kvm).
#include <sys/types.h>

#include <filesystem>
#include <optional>
#include <string>

#include "runtime/base/child_process.hpp"
#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// The default of qemu_user when the runner runs as root (deploy/install-deps.sh
// creates it).
inline constexpr const char* default_qemu_user = "solstice-qemu";

// The qemu_user a config asks for: its value when set (even ""), else
// default_qemu_user when the runner runs as root, else "".
std::string configured_qemu_user(const v1::RunnerConfig& config);

struct QemuUser {
  std::string name;
  ProcessCredentials credentials;  // uid, primary gid, supplementary groups
};

// nullopt when QEMU runs as the runner's own user: `name` empty, or the runner
// already is that user. Errors: no such user, root, or a runner that is not root
// and so cannot switch to another user.
Result<std::optional<QemuUser>> resolve_qemu_user(const std::string& name);

// Before QEMU starts: gives `user` what its VM needs and nothing more. The work
// directory (state_dir/run/<id>) becomes group `user` with mode 1770 (QEMU makes its
// QMP socket there; the sticky bit keeps it from replacing the runner's files), the
// overlay group read-write, the seed group read-only; state_dir and state_dir/run get
// search permission for others (not read: nobody else can list them). Checks that
// the user can reach the work directory and read `read_only` files (image, kernel,
// initrd); errors name the path and what to change.
struct VmFiles {
  std::filesystem::path state_dir;
  std::filesystem::path work_dir;
  std::filesystem::path writable_disk;  // the overlay, or empty
  std::filesystem::path seed_iso;       // or empty
  std::filesystem::path firmware_vars;  // the VM's UEFI variables store (read-write), or empty
  std::vector<std::filesystem::path> read_only;
  std::filesystem::path uploads_iso;    // the job's uploads ISO (read-only), or empty
};
Result<void> share_vm_files(const QemuUser& user, const VmFiles& files);

}  // namespace solstice
