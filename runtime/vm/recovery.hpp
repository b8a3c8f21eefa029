#pragma once
// Crash recovery: what a runner that died (SIGKILL, power loss, OOM) left under
// state_dir/run/, found and cleaned by the next runner that starts.
//
// While a VM exists its work directory holds `owner.json`: which runner process owns
// it and which QEMU runs it, each as PID plus start time (PIDs are reused; the pair
// is not). A later runner removes every work directory whose owner is gone, kills a
// QEMU that outlived it (only after checking start time and command line), and
// records the job as an infrastructure error.
#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// The file name of the owner record inside a VM's work directory.
inline constexpr const char* owner_record_file = "owner.json";

struct OwnerRecord {
  pid_t runner_pid = 0;
  unsigned long long runner_start_time = 0;  // clock ticks since boot (/proc/PID/stat)
  pid_t qemu_pid = 0;                         // 0 while QEMU is not started yet
  unsigned long long qemu_start_time = 0;
  std::string job_id;
  std::string job_dir;
  std::string work_dir;
};

// The record for a VM of this process: runner = the calling process, QEMU from
// the handle (qemu_pid and qemu_start_time; 0 before launch).
OwnerRecord owner_record_for(const v1::VmHandle& handle);

// Writes work_dir/owner.json atomically (temporary file + rename), mode 0600.
Result<void> write_owner_record(const std::filesystem::path& work_dir, const OwnerRecord& record);
Result<OwnerRecord> read_owner_record(const std::filesystem::path& work_dir);
// Removes work_dir/owner.json; a missing file is fine.
void remove_owner_record(const std::filesystem::path& work_dir);

// The message recorded for a job whose runner died while it ran.
inline constexpr const char* abandoned_job_error =
  "the runner stopped while the job was running (recovered at next start)";

struct RecoveredJob {
  std::string job_id;
  std::filesystem::path work_dir;
  pid_t runner_pid = 0;      // 0 when there was no owner record
  pid_t qemu_pid = 0;        // the QEMU that survived its runner, else 0
  bool qemu_killed = false;  // it was still running and has been killed
  // An infrastructure_error result was written now; false when the job already
  // had a result (its runner died while tearing down) or has no job directory.
  bool result_recorded = false;
  // One line for the user: what was found and what was done.
  std::string description;
};

struct RecoveryOptions {
  // A work directory without an owner record is being prepared; older than this
  // (newest modification of the directory or a file in it) it was abandoned.
  std::chrono::seconds unowned_grace{60};
  // How long to wait for a killed QEMU to go away.
  std::chrono::milliseconds kill_wait{5000};
};

// Scans state_dir/run/* and cleans what dead runners left (see above). Entries of a
// runner still alive are left alone. Missing run/ is not an error. The error case is
// only for a state directory that cannot be read; a single entry that cannot be
// cleaned is reported in its description and the scan goes on.
Result<std::vector<RecoveredJob>> recover_abandoned_jobs(const v1::RunnerConfig& config,
                                                          const RecoveryOptions& options = {});

}  // namespace solstice
