#pragma once
// The runner's own configuration (protobuf JSON of v1::RunnerConfig), its defaults,
// and turning a job's image / runs_on into the ImageSpec a VM is made from.
#include <filesystem>
#include <string>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// Label of the built-in test guest (deploy/test-guest).
inline constexpr const char* test_guest_label = "solstice-test-guest";

// state_dir: /var/lib/solstice-runner as root, else $XDG_STATE_HOME/solstice-runner
// or ~/.local/state/solstice-runner; qemu-system-x86_64, accel "auto", job timeout
// 3600 s, boot timeout 300 s, powerdown timeout 30 s, 2 concurrent VMs, no images;
// qemu_user "solstice-qemu" as root, else unset (QEMU runs as the runner's user).
v1::RunnerConfig default_runner_config();

// Reads a config file; fields it leaves out keep default_runner_config()'s values;
// relative image paths are resolved against the file's directory.
Result<v1::RunnerConfig> load_runner_config(const std::filesystem::path& path);

// Checks values a config file can get wrong (accel, image labels, sizes).
Result<void> validate_runner_config(const v1::RunnerConfig& config);

// How many restored jobs may start at once on this host: max_concurrent_starts,
// or the host's CPU cores where it is left out (a restored start under TCG keeps
// a core busy; more starts than cores only share them, each slower, together
// slower still). 0: no limit.
unsigned max_concurrent_starts_of(const v1::RunnerConfig& config);

// "qcow2" (magic "QFI\xfb") or "raw"; an error for a missing, unreadable, empty or
// non-regular file. `what` names the field in messages ("image", "images[0].disk").
Result<std::string> detect_disk_format(const std::filesystem::path& path,
                                       const std::string& what);

// The ImageSpec for a job: its own image path (defaults: user "runner", 1 vcpu,
// 512 MiB, machine "pc", disk boot, format detected) or the configured image of its
// runs_on label (empty fields get the same defaults); the job's vcpus / memory_mib
// override the image's when set. Files the image names must exist.
Result<v1::ImageSpec> resolve_image(const v1::JobSpec& job, const v1::RunnerConfig& config);

// The built test guest: reads `dir/guest.json` ({"user_default", "disk",
// "disk_format", "kernel", "initrd", "cmdline", "machine", "memory_mib", "vcpus",
// "firmware"},
// all optional but one of disk / kernel) into an ImageSpec labelled
// "solstice-test-guest" with absolute paths; kernel boot when a kernel is given.
Result<v1::ImageSpec> load_test_guest_image(const std::filesystem::path& dir);

}  // namespace solstice
