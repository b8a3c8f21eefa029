#pragma once
// "Get the files for a VM": the prepare step of a job, as a plain function. Makes
// the job's directory (kept: logs, result, artifacts) and the VM's work directory
// (removed at cleanup: overlay, seed ISO, QMP socket), the ephemeral keys and the
// seed. Everything it made is removed again when it fails.
#include <cstdint>
#include <filesystem>
#include <string>

#include "runtime/base/error.hpp"
#include "runtime/vm/qemu_argv.hpp"
#include "solstice.pb.h"

namespace solstice {

// OVMF from Debian's ovmf package: the firmware (read-only) and the template of
// the variables store each UEFI VM gets a copy of.
inline constexpr const char* ovmf_code_path = "/usr/share/OVMF/OVMF_CODE.fd";
inline constexpr const char* ovmf_vars_path = "/usr/share/OVMF/OVMF_VARS.fd";

// state_dir/jobs/<job id>
std::filesystem::path job_dir_for(const v1::RunnerConfig& config, const std::string& job_id);
// state_dir/run/<job id>
std::filesystem::path work_dir_for(const v1::RunnerConfig& config, const std::string& job_id);

// The job's console.log in its record (job_dir/console.log), written redacted by the
// console tailer from QEMU's raw capture (handle.console_log(), in the work directory).
// Empty when the handle has no job directory.
std::filesystem::path console_record_path(const v1::VmHandle& handle);

// The guest's hostname for a job: "solstice-" and the job id's letters and digits.
std::string guest_hostname(const std::string& job_id);

// Creates `dir` (mode 0700) and missing parents (0701: searchable, not listable),
// then sets `dir` itself to 0700.
Result<void> make_private_dir(const std::filesystem::path& dir);

// Creates `dir` (0700) and missing parents (0701); leaves existing ones as they are
// (state_dir and state_dir/run carry o+x for QEMU's user, see qemu_user.hpp, and a
// VM starting meanwhile needs it).
Result<void> make_missing_dirs(const std::filesystem::path& dir);

// "kvm" or "tcg" for a configured accel ("auto", "kvm", "tcg").
std::string resolve_accel(const std::string& configured, const std::string& kvm_device = {});

// Asks `qemu-img info` (read only, no lock taken, the whole backing chain opened)
// whether QEMU can use the disk image at `disk` as `format` ("qcow2" or "raw"), so
// that an image it cannot open is refused before any VM starts instead of when the
// VM's overlay is made. Errors start with `what` and the path: qemu-img could not
// open it (its own message follows: a corrupt qcow2, a missing backing file), QEMU
// sees another format than `format`, or a qcow2 image marks itself corrupt. Takes a
// few milliseconds; qemu-img gets at most 10 s.
Result<void> check_disk_image(const std::filesystem::path& disk, const std::string& format,
                              const std::string& what);

// A qcow2 overlay at `overlay` whose backing file is `base` (of `base_format`).
Result<void> create_overlay(const std::string& qemu_img, const std::filesystem::path& base,
                            const std::string& base_format, const std::filesystem::path& overlay);

// A random GUID (RFC 4122 version 4) for QEMU's vmgenid device.
std::string random_guid();

// A job's uploads that total at least this many bytes travel on a read-only ISO in
// the VM's uploads drive (README "Uploads"): under TCG, SSH's emulated crypto caps
// SFTP at a few MiB/s, an ISO is copied at tens; below it, SFTP (no mount's cost).
inline constexpr uint64_t uploads_iso_min_bytes = 8u << 20;

// Prepares everything the VM of `job` needs for boot attempt number `attempt`
// (1, 2, ...: names that differ per attempt carry it). The handle keeps vcpus and memory.
// Its uploads_iso is set when the uploads went on an ISO (uploads_iso_min_bytes).
Result<v1::VmHandle> prepare_vm(const v1::JobSpec& job, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config, uint32_t attempt = 1);

// The descriptor number a restoring QEMU reads its migration stream from (passed
// after the console capture's): "fd:N" for QMP migrate-incoming.
inline int incoming_fd_number(const v1::VmHandle& handle) {
  return handle.console_log().empty() ? 3 : 4;
}

// The QEMU description of a prepared VM (vcpus and memory from the handle).
VmSpec vm_spec_from_handle(const v1::VmHandle& handle);

// Removes the VM's work directory (the job directory stays).
Result<void> cleanup_vm(const v1::VmHandle& handle);

}  // namespace solstice
