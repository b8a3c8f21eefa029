#pragma once
// `solstice-runner jobs logs`: a job's output replayed from its events.jsonl.
#include "runtime/job/job_records.hpp"

namespace solstice {

struct LogsOptions {
  unsigned step = 0;    // 1-based, as the summary table numbers steps; 0 = every step
  bool raw = false;     // only the steps' bytes, exactly as written, nothing else
  bool follow = false;  // keep reading while the job runs, until its result
  bool json = false;    // the events themselves, one JSON line each
};

// Writes the job's output: stdout bytes to stdout, stderr bytes to stderr, and
// (unless raw) each step's start and end and the summary table. Returns the
// command's exit code.
int replay_job_log(const JobRecordInfo& job, const LogsOptions& options);

}  // namespace solstice
