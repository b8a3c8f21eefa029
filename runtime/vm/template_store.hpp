#pragma once
// The template store in the state dir: booted-and-frozen VMs that jobs restore
// instead of booting (README "Fast starts").
//
//   state_dir/templates/<id>/          a ready template (published by one rename)
//       manifest.json                  what it was built from (the key's inputs), when, how long
//       state                          QEMU's migration stream of the stopped guest
//       overlay.qcow2                  the frozen disk overlay (mode 0444; clones' backing file)
//       seed.iso                       the seed CD-ROM it booted with
//       key, key.pub                   the template's SSH key pair (0600; never leaves the host)
//                                      (manifest "identity_agent": clones get their identity over
//                                      the virtio-serial port; else over SSH)
//       stale                          present once a restore failed: never restored again
//   state_dir/templates/<id>.lock      flock: one build at a time, across runner processes
//   state_dir/templates/<id>.failed    when and why the last build failed (jobs then boot
//                                      cold for a while instead of failing the same way)
//   state_dir/templates/hashes/        content hashes of images by (device, inode, size, mtime)
//
// A template's id is a hash of everything a restore depends on: the image's content
// (sha256 of disk, kernel, initrd), the VM shape (machine, accel, vcpus, memory,
// firmware, kernel command line, user) and QEMU's version. Anything changed gives
// another id, so a stale template is never found.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// Bumped when the way templates are made changes (devices, guest recipe): a
// template of another format has another key, so it is never restored.
// 2: the virtio-serial identity port and its agent (identity_channel.hpp).
// 3: the agent also makes the job's files (guest_commands.hpp, GuestJobFiles).
// 4: every VM has the (empty) uploads CD-ROM drive (qemu_argv.hpp, uploads_drive_id).
// 5: the agent is a perl program where the guest has perl and OpenSSH.
inline constexpr int template_format = 5;

std::filesystem::path templates_dir(const std::string& state_dir);

// The sha256 of a file, from state_dir/templates/hashes when its (device, inode,
// size, mtime_ns) were hashed before; else hashed now and remembered.
Result<std::string> cached_file_sha256(const std::string& state_dir,
                                       const std::filesystem::path& file);

// `qemu --version`'s first line, from state_dir/templates/qemu-versions when the
// binary's (device, inode, size, mtime_ns) asked before; else asked now and
// remembered there (an empty state_dir: asked every time).
Result<std::string> qemu_version_of(const std::string& qemu_binary, const std::string& state_dir);

// Whether a job on `image` can use a template at all: "" when it can, else why not
// (UEFI firmware, extra user-data, ...), for the job's notice.
std::string template_unsupported(const v1::JobSpec& job, const v1::ImageSpec& image);

struct TemplateKey {
  std::string id;          // 24 hex digits
  nlohmann::json inputs;   // what the id is the hash of
};

// The key of `image` (disk, kernel, initrd hashed with cached_file_sha256, or the
// image cache's sha256 when the disk is its blob) run with `accel` ("kvm"/"tcg").
Result<TemplateKey> template_key_for(const v1::ImageSpec& image, const v1::RunnerConfig& config,
                                     const std::string& accel);

struct TemplateInfo {
  std::string id;
  std::string label;
  std::filesystem::path dir;
  nlohmann::json inputs;
  int64_t built_at_us = 0;
  int64_t build_ms = 0;
  uint64_t state_bytes = 0;
  std::string stale;  // why it is stale; "" when usable
  // Its guest runs the identity agent; else why not (identity_note).
  bool identity_agent = false;
  std::string identity_note;
  // cloud-init ended with errors in its guest before it was saved.
  bool cloud_init_errors = false;
};

// What the template's build learnt about its guest (recorded in the manifest).
struct TemplateGuestFacts {
  // Its guest runs the identity agent; else `identity_note` says why not.
  bool identity_agent = false;
  std::string identity_note;
  bool cloud_init_errors = false;
};

// An exclusive flock on templates/<id>.lock, released by the destructor.
class TemplateLock {
 public:
  TemplateLock() = default;
  TemplateLock(TemplateLock&& other) noexcept;
  TemplateLock& operator=(TemplateLock&& other) noexcept;
  ~TemplateLock();
  // Blocks until the lock is free (another process or thread building).
  static Result<TemplateLock> acquire(const std::string& state_dir, const std::string& id);

 private:
  int fd_ = -1;
};

class TemplateStore {
 public:
  explicit TemplateStore(std::string state_dir) : state_dir_(std::move(state_dir)) {}

  std::filesystem::path dir_of(const std::string& id) const;
  // The ready, not stale, template `id` with all its files; nullopt otherwise.
  std::optional<TemplateInfo> find_ready(const std::string& id) const;
  // What a clone needs of the ready template `id`.
  Result<v1::RestoreFrom> restore_spec(const std::string& id) const;
  // Every template (stale ones too), by label then id.
  std::vector<TemplateInfo> list() const;
  // Never restored again; `why` is kept in the `stale` file.
  Result<void> mark_stale(const std::string& id, const std::string& why) const;
  // Removes template `id` (under its lock: not while it is built). Running clones
  // keep their open files.
  Result<void> remove(const std::string& id) const;
  // A fresh private directory for a build of `id` (templates/.build-<id>-<pid>-<n>).
  Result<std::filesystem::path> make_build_dir(const std::string& id) const;
  // A failed build is remembered (templates/<id>.failed), so that the jobs after it
  // boot cold at once instead of each paying for the same failure again.
  Result<void> note_failed_build(const std::string& id, const std::string& why) const;
  // Why the last build of `id` failed, when that was less than `within_us` ago.
  std::optional<std::string> recent_failed_build(const std::string& id, int64_t within_us) const;
  // Writes the manifest into `build_dir`, freezes its overlay and renames it to
  // dir_of(key.id), replacing a stale or older one. The caller holds the lock.
  Result<TemplateInfo> publish(const std::filesystem::path& build_dir, const TemplateKey& key,
                               const std::string& label, int64_t build_ms,
                               const TemplateGuestFacts& guest = {}) const;

 private:
  std::string state_dir_;
};

}  // namespace solstice
