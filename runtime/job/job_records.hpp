#pragma once
// The job records under state_dir/jobs/<id>/ as the `jobs` commands read them:
// what each job is (its first event, job_started), whether it ended (result.json)
// or which live process runs it (owner.json), its events read as they are
// written, and the cancel request another process leaves for the job's runner.
#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// The file a `jobs cancel` writes into a job's record; the process running the
// job looks for it (every 250 ms), removes it and cancels the job.
inline constexpr const char* cancel_request_file = "cancel-request";

// What a job record says about its job.
struct JobRecordInfo {
  std::string job_id;
  std::filesystem::path dir;
  // From the job's first event (job_started); empty in records made before it existed.
  std::optional<v1::JobStarted> started;
  std::optional<v1::JobResult> result;
  // "running" (its runner process is alive), "abandoned" (it is not, and no
  // result was recorded), or the result's status: "succeeded", "failed",
  // "timed_out", "cancelled", "infrastructure_error".
  std::string state;
  pid_t runner_pid = 0;  // the process that runs (or ran) the job; 0 if unknown
  int64_t started_at_us = 0;
  int64_t ended_at_us = 0;  // 0 while running
};

// Records that this process runs the job of `job_dir` (job_dir/owner.json: PID
// and process start time), so other processes can tell it is running and ask
// it to cancel.
Result<void> write_job_owner(const std::filesystem::path& job_dir, const std::string& job_id);

// Every job record in `state_dir`, oldest first. A missing jobs/ is no error.
Result<std::vector<JobRecordInfo>> list_job_records(const std::filesystem::path& state_dir);

// The record of job `id`: the exact id, else the one id that starts or ends with
// `id` (the random suffix is enough). An error names the id and why it matches
// nothing, or the ids it matches.
Result<JobRecordInfo> find_job_record(const std::filesystem::path& state_dir,
                                      const std::string& id);

// Reads the record's current state again.
JobRecordInfo read_job_record(const std::filesystem::path& dir);

// Whether the process that runs the record's job is alive (the same PID and
// start time as recorded).
bool job_runner_alive(const std::filesystem::path& job_dir);

// Leaves a cancel request for the job's runner (mode 0600).
Result<void> request_cancel(const std::filesystem::path& job_dir);
// Whether a cancel request is waiting; it is removed when there is one.
bool take_cancel_request(const std::filesystem::path& job_dir);

// Reads an events.jsonl as it grows: each call returns events completed since
// the last one (a line still being written waits for its newline), at most a few
// MiB of them; at_end() says whether the call reached the end of the file.
class EventFollower {
 public:
  explicit EventFollower(std::filesystem::path path) : path_(std::move(path)) {}
  Result<std::vector<v1::JobEvent>> read_new();
  bool at_end() const { return at_end_; }

 private:
  bool at_end_ = false;
  std::filesystem::path path_;
  uint64_t offset_ = 0;
  uint64_t line_number_ = 0;
  std::string partial_;
};

// "succeeded", "timed_out", …: a status as the records and `jobs` show it.
std::string status_name(v1::JobStatus status);

}  // namespace solstice
