#include "runtime/vm/job_claim.hpp"

#include <sys/file.h>
#include <sys/stat.h>

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

#include "runtime/base/error.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace fs = std::filesystem;

namespace {

using Kind = ClaimRefusal::Kind;

tl::unexpected<ClaimRefusal> refuse(Kind kind, std::string message) {
  return tl::unexpected<ClaimRefusal>{ClaimRefusal{kind, std::move(message)}};
}

int open_dir(const fs::path& path) {
  return ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
}

// Whether `fd` is still the directory at `path` (not moved away since it was opened).
bool same_directory(int fd, const fs::path& path) {
  struct stat opened {}, named {};
  return ::fstat(fd, &opened) == 0 && ::lstat(path.c_str(), &named) == 0 &&
         opened.st_dev == named.st_dev && opened.st_ino == named.st_ino;
}

// Moves `from` to `to` unless `to` exists. File systems without RENAME_NOREPLACE
// (EINVAL, e.g. NFS) get a plain rename: it still fails on a record with files in
// it, and a record is empty only between its claim and its first event.
bool place(const fs::path& from, const fs::path& to) {
  if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0)
    return true;
  if (errno != EINVAL && errno != ENOSYS)
    return false;
  struct stat existing {};
  if (::lstat(to.c_str(), &existing) == 0) {
    errno = EEXIST;
    return false;
  }
  return ::rename(from.c_str(), to.c_str()) == 0;
}

// A private directory on the records' file system, locked before anyone can see it under
// the record's name.
struct Staged {
  int fd = -1;
  fs::path path;
  void discard() {
    if (fd >= 0)
      ::close(fd);
    fd = -1;
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

tl::expected<Staged, ClaimRefusal> stage(const fs::path& dir, const std::string& job_id) {
  std::string name = (dir / (".claim-" + job_id + "-XXXXXX")).string();
  if (::mkdtemp(name.data()) == nullptr)  // mode 0700
    return refuse(Kind::failed, errno_message("cannot create a directory in " + dir.string(), errno));
  Staged staged{open_dir(name), name};
  if (staged.fd < 0 || ::flock(staged.fd, LOCK_EX | LOCK_NB) != 0) {
    auto message = errno_message("cannot lock " + name, errno);
    staged.discard();
    return refuse(Kind::failed, message);
  }
  return staged;
}

// The paths of one claim and the refusals that name them.
struct ClaimPaths {
  std::string job_id;
  fs::path record, work;
  bool work_exists() const {
    std::error_code ec;
    return fs::exists(fs::symlink_status(work, ec));
  }
  tl::unexpected<ClaimRefusal> leftover() const {
    return refuse(Kind::leftover,
                  "job id \"" + job_id + "\": " + work.string() +
                    " still holds the VM files of a runner that stopped; the next runner start "
                    "cleans them up (after 60 s when they have no owner record), then run again");
  }
};

// A record exists already. Refuses (and discards `staged`) when it is live, or
// finished and not to be replaced; with `replace`, moves it aside under its own
// lock, puts `staged` in its place and removes the old one. Returns whether
// `staged` is now the record (false: look again, the record changed meanwhile).
tl::expected<bool, ClaimRefusal> settle_existing(const ClaimPaths& paths, Staged& staged,
                                                 bool replace) {
  const auto& record = paths.record;
  int old = open_dir(record);
  if (old < 0 && errno == ENOENT)
    return false;  // removed in between
  const auto refused = [&](tl::unexpected<ClaimRefusal> refusal) {
    if (old >= 0)
      ::close(old);
    staged.discard();
    return refusal;
  };
  if (old < 0)
    return refused(refuse(Kind::failed, errno_message("cannot open the record " + record.string(), errno)));
  if (::flock(old, LOCK_EX | LOCK_NB) != 0)
    return refused(refuse(Kind::live, "job id \"" + paths.job_id + "\" is in use by a job that is "
                                      "running now (its record: " + record.string() +
                                      "); give this job another id"));
  if (!same_directory(old, record)) {
    ::close(old);
    return false;
  }
  if (paths.work_exists())
    return refused(paths.leftover());
  if (!replace)
    return refused(refuse(Kind::finished, "job id \"" + paths.job_id + "\" has a record already (" +
                                            record.string() + "); give another id, or --replace "
                                            "to remove that record and run the job again"));
  // Its VM files do not exist (checked above, and only a claim's holder makes them).
  auto doomed = staged.path.string() + ".replaced";
  if (::rename(record.c_str(), doomed.c_str()) != 0)
    return refused(refuse(Kind::failed, errno_message("cannot move the old record " +
                                                        record.string() + " aside", errno)));
  const bool placed = place(staged.path, record);
  std::error_code ec;
  fs::remove_all(doomed, ec);
  ::close(old);
  return placed;  // not placed: another runner claimed the id in between
}

}  // namespace

tl::expected<std::unique_ptr<JobClaim>, ClaimRefusal>
JobClaim::take(const v1::RunnerConfig& config, const std::string& job_id, bool replace) {
  if (job_id.empty() || job_id.front() == '.' || job_id.find('/') != std::string::npos)
    return refuse(Kind::failed, "internal: job id \"" + job_id + "\" cannot name a record");
  const ClaimPaths paths{job_id, job_dir_for(config, job_id), work_dir_for(config, job_id)};
  for (const auto& dir : {paths.record.parent_path(), paths.work.parent_path()})
    if (auto made = make_missing_dirs(dir); !made)
      return refuse(Kind::failed, made.error().message);
  // Staged in the state directory itself (same file system as jobs/), so that
  // nothing reading jobs/ ever sees a half-made record.
  auto staged = stage(paths.record.parent_path().parent_path(), job_id);
  if (!staged)
    return tl::unexpected(staged.error());

  // A few rounds: a record may be replaced or removed while we look at it.
  for (int round = 0; round < 5; ++round) {
    bool placed = place(staged->path, paths.record);
    if (!placed && errno != EEXIST && errno != ENOTEMPTY) {
      auto message = errno_message("cannot create the record " + paths.record.string(), errno);
      staged->discard();
      return refuse(Kind::failed, message);
    }
    if (!placed) {
      auto settled = settle_existing(paths, *staged, replace);
      if (!settled)
        return tl::unexpected(settled.error());
      placed = *settled;
    }
    if (!placed)
      continue;
    std::unique_ptr<JobClaim> claim(new JobClaim(std::exchange(staged->fd, -1), paths.record));
    if (!paths.work_exists())
      return claim;
    claim->remove_record();  // a stopped runner's VM files appeared without a record
    return paths.leftover();
  }
  staged->discard();
  return refuse(Kind::live, "job id \"" + job_id + "\": its record " + paths.record.string() +
                              " keeps changing (other runners are claiming it); try again");
}

JobClaim::~JobClaim() {
  if (fd_ >= 0)
    ::close(fd_);  // releases the lock
}

void JobClaim::remove_record() {
  if (fd_ >= 0 && same_directory(fd_, job_dir_)) {
    std::error_code ec;
    fs::remove_all(job_dir_, ec);
  }
}

}  // namespace solstice
