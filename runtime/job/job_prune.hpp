#pragma once
// `solstice-runner prune`: removes finished job records (state_dir/jobs/<id>) by
// age or by count. A record is finished when nobody holds its claim (the flock of
// runtime/vm/job_claim.hpp) and no VM files of it are left (run/<id>, which the next
// runner start recovers first). A live record is never touched: each record is
// locked while it is looked at and removed, so a job cannot claim it in between.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "runtime/base/error.hpp"

namespace solstice {

struct PruneRule {
  // Exactly one of the two.
  std::optional<std::chrono::seconds> older_than;  // finished longer ago than this
  std::optional<unsigned> keep;                     // all but the `keep` newest finished
  bool dry_run = false;                             // say what would go, remove nothing
};

struct PrunedRecord {
  std::string job_id;
  std::filesystem::path dir;
  std::chrono::system_clock::time_point finished;  // result.json's time, else the record's
  uint64_t bytes = 0;
};

struct PruneReport {
  std::vector<PrunedRecord> removed;  // (dry run: would be removed), oldest first
  std::vector<std::string> kept_live;  // ids of records skipped as running or unrecovered
};

// "7d", "12h", "30m", "45s", "2w" (a whole number and a unit). Errors name the text.
Result<std::chrono::seconds> parse_age(const std::string& text);

Result<PruneReport> prune_job_records(const std::filesystem::path& state_dir, const PruneRule& rule);

}  // namespace solstice
