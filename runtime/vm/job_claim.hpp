#pragma once
// The exclusive claim of a job id in a state directory: who may write
// state_dir/jobs/<id> (the record) and state_dir/run/<id> (the VM's work files).
//
// The claim is an flock(2) on the record directory, held for as long as the job
// runs. The directory is made under a private name, locked, and only then renamed
// into place (renameat2 RENAME_NOREPLACE), so a record that exists and is not locked
// belongs to nobody: its runner finished or died (the kernel drops a dead process's
// locks, so a killed runner leaves no stale claim; recovery then records its job).
//   - a record that is locked is a live job: refused;
//   - a record that is not locked is a finished job: refused, unless `replace` is
//     given, which removes the old record (under its lock) before the new one exists;
//   - a run/<id> that exists is the VM of a runner that stopped and has not been
//     cleaned yet (recovery does it): refused, and nothing is removed.
#include <filesystem>
#include <memory>
#include <string>

#include <tl/expected.hpp>

#include "solstice.pb.h"

namespace solstice {

struct ClaimRefusal {
  enum class Kind {
    live,      // another job with this id runs now
    finished,  // a record of this id exists (pass replace to remove it)
    leftover,  // run/<id> of a stopped runner is still there
    failed,    // the state directory could not be read or written
  };
  Kind kind = Kind::failed;
  std::string message;  // names the id and the path, says what to do
};

class JobClaim {
 public:
  // Claims `job_id` in config.state_dir (making state_dir/jobs and state_dir/run
  // when missing). On success the record directory exists, empty, mode 0700.
  static tl::expected<std::unique_ptr<JobClaim>, ClaimRefusal>
  take(const v1::RunnerConfig& config, const std::string& job_id, bool replace);

  // Releases the claim; the record stays.
  ~JobClaim();
  JobClaim(const JobClaim&) = delete;
  JobClaim& operator=(const JobClaim&) = delete;

  const std::filesystem::path& job_dir() const { return job_dir_; }
  // For a job that could not start after all: removes the record it claimed.
  void remove_record();

 private:
  JobClaim(int fd, std::filesystem::path job_dir) : fd_(fd), job_dir_(std::move(job_dir)) {}
  int fd_ = -1;
  std::filesystem::path job_dir_;
};

}  // namespace solstice
