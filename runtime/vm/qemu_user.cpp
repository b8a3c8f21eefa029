#include "runtime/vm/qemu_user.hpp"

#include <grp.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <vector>

namespace solstice {

namespace fs = std::filesystem;

namespace {

std::string octal_mode(mode_t mode) {
  char text[8];
  std::snprintf(text, sizeof text, "%04o", static_cast<unsigned>(mode & 07777));
  return text;
}

std::string described(const QemuUser& user) {
  return "user " + user.name + " (uid " + std::to_string(user.credentials.uid) + ")";
}

// Whether `user` has every bit of `want` (04 read, 02 write, 01 search) on a file
// with this owner and mode, by mode bits alone (an ACL granting more is not seen).
bool permits(const QemuUser& user, const struct stat& info, unsigned want) {
  const auto& creds = user.credentials;
  unsigned bits;
  if (info.st_uid == creds.uid) {
    bits = (info.st_mode >> 6) & 07;
  } else if (info.st_gid == creds.gid ||
             std::find(creds.groups.begin(), creds.groups.end(), info.st_gid) != creds.groups.end()) {
    bits = (info.st_mode >> 3) & 07;
  } else {
    bits = info.st_mode & 07;
  }
  return (bits & want) == want;
}

// Checks that `user` can search every directory above `path` and has `want` on it.
Result<void> check_reachable(const QemuUser& user, const fs::path& path, unsigned want,
                             const std::string& what) {
  const fs::path absolute = fs::absolute(path).lexically_normal();
  fs::path prefix;
  for (auto part = absolute.begin(); part != absolute.end(); ++part) {
    prefix /= *part;
    const bool last = std::next(part) == absolute.end();
    struct stat info {};
    if (::stat(prefix.c_str(), &info) != 0)
      return fail(errno_message("cannot check " + what + " " + path.string() + " for QEMU's " +
                                  described(user) + ": " + prefix.string(), errno));
    const unsigned needed = last ? want : 01;
    if (!permits(user, info, needed))
      return fail("QEMU runs as " + described(user) + ", which cannot " +
                  (last ? (want & 02 ? "write " : "read ") : "reach ") + what + " " + path.string() +
                  ": " + prefix.string() + " has mode " + octal_mode(info.st_mode) + ", owner uid " +
                  std::to_string(info.st_uid) + ", group " + std::to_string(info.st_gid) +
                  " (make it " + (last ? "readable" : "searchable, chmod o+x,") +
                  " for that user, or set qemu_user to \"\" to run QEMU as the runner's user)");
  }
  return {};
}

Result<void> give_group(const fs::path& path, gid_t gid, mode_t mode) {
  if (::chown(path.c_str(), static_cast<uid_t>(-1), gid) != 0)
    return fail(errno_message("cannot give " + path.string() + " to group " + std::to_string(gid), errno));
  if (::chmod(path.c_str(), mode) != 0)
    return fail(errno_message("cannot set mode " + octal_mode(mode) + " on " + path.string(), errno));
  return {};
}

Result<void> add_search_for_others(const fs::path& dir) {
  struct stat info {};
  if (::stat(dir.c_str(), &info) != 0)
    return fail(errno_message("cannot stat " + dir.string(), errno));
  if ((info.st_mode & S_IXOTH) == 0 && ::chmod(dir.c_str(), (info.st_mode & 07777) | S_IXOTH) != 0)
    return fail(errno_message("cannot add search permission (o+x) to " + dir.string(), errno));
  return {};
}

}  // namespace

std::string configured_qemu_user(const v1::RunnerConfig& config) {
  if (config.has_qemu_user()) return config.qemu_user();
  return ::geteuid() == 0 ? default_qemu_user : "";
}

Result<std::optional<QemuUser>> resolve_qemu_user(const std::string& name) {
  if (name.empty()) return std::nullopt;
  std::vector<char> buffer(16384);
  passwd entry{};
  passwd* found = nullptr;
  int err = ::getpwnam_r(name.c_str(), &entry, buffer.data(), buffer.size(), &found);
  if (err != 0) return fail(errno_message("qemu_user \"" + name + "\": cannot look the user up", err));
  if (found == nullptr)
    return fail("qemu_user \"" + name + "\": no such user. Create it (deploy/install-deps.sh does: "
                "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin " + name +
                ", and adds it to group kvm) or set qemu_user to \"\" to run QEMU as the runner's user");
  if (entry.pw_uid == 0)
    return fail("qemu_user \"" + name + "\" is root (uid 0): QEMU must run as an unprivileged user");
  if (::geteuid() == entry.pw_uid) return std::nullopt;
  if (::geteuid() != 0)
    return fail("qemu_user \"" + name + "\": the runner runs as uid " + std::to_string(::geteuid()) +
                ", not root, so it cannot start QEMU as another user; set qemu_user to \"\"");

  QemuUser user;
  user.name = name;
  user.credentials.uid = entry.pw_uid;
  user.credentials.gid = entry.pw_gid;
  int count = 32;
  std::vector<gid_t> groups(static_cast<size_t>(count));
  while (::getgrouplist(name.c_str(), entry.pw_gid, groups.data(), &count) < 0) {
    groups.resize(static_cast<size_t>(count));
  }
  groups.resize(static_cast<size_t>(count));
  user.credentials.groups = std::move(groups);
  return user;
}

Result<void> share_vm_files(const QemuUser& user, const VmFiles& files) {
  const gid_t gid = user.credentials.gid;
  // Only the runner's own directories get o+x; anything above them is checked below.
  // A job's VM works in run/<id>, a template build in templates/.build-<id>-...
  const auto parent = files.work_dir.parent_path();
  if (parent == files.state_dir / "run" || parent == files.state_dir / "templates") {
    for (const auto& dir : {files.state_dir, parent})
      if (auto ok = add_search_for_others(dir); !ok) return ok;
  }
  if (auto ok = give_group(files.work_dir, gid, 01770); !ok) return ok;
  if (auto ok = check_reachable(user, files.work_dir, 03, "its work directory"); !ok) return ok;
  if (!files.writable_disk.empty())
    if (auto ok = give_group(files.writable_disk, gid, 0660); !ok) return ok;
  if (!files.seed_iso.empty())
    if (auto ok = give_group(files.seed_iso, gid, 0640); !ok) return ok;
  if (!files.uploads_iso.empty())
    if (auto ok = give_group(files.uploads_iso, gid, 0640); !ok) return ok;
  if (!files.firmware_vars.empty())
    if (auto ok = give_group(files.firmware_vars, gid, 0660); !ok) return ok;
  for (const auto& path : files.read_only)
    if (!path.empty())
      if (auto ok = check_reachable(user, path, 04, "the image file"); !ok) return ok;
  return {};
}

}  // namespace solstice
