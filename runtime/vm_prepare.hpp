#pragma once
// "Get the files for a VM": the prepare step of a job, as a plain function. Makes
// the job's directory (kept: logs, result, artifacts) and the VM's work directory
// (removed at cleanup: overlay, seed ISO, QMP socket), the ephemeral keys and the
// seed. Everything it made is removed again when it fails.
#include <filesystem>
#include <string>

#include "runtime/error.hpp"
#include "runtime/qemu_argv.hpp"
#include "solstice.pb.h"

namespace solstice {

// state_dir/jobs/<job id>
std::filesystem::path job_dir_for(const v1::RunnerConfig& config, const std::string& job_id);
// state_dir/run/<job id>
std::filesystem::path work_dir_for(const v1::RunnerConfig& config, const std::string& job_id);

// Creates `dir` and missing parents with mode 0700.
Result<void> make_private_dir(const std::filesystem::path& dir);

// "kvm" or "tcg" for a configured accel ("auto", "kvm", "tcg").
std::string resolve_accel(const std::string& configured);

// Prepares everything the VM of `job` needs. The handle keeps vcpus and memory.
Result<v1::VmHandle> prepare_vm(const v1::JobSpec& job, const v1::ImageSpec& image,
                                const v1::RunnerConfig& config);

// The QEMU description of a prepared VM (vcpus and memory from the handle).
VmSpec vm_spec_from_handle(const v1::VmHandle& handle);

// Removes the VM's work directory (the job directory stays).
Result<void> cleanup_vm(const v1::VmHandle& handle);

}  // namespace solstice
