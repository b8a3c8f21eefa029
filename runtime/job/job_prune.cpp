#include "runtime/job/job_prune.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>

namespace solstice {

namespace fs = std::filesystem;
using std::chrono::system_clock;

namespace {

// A record looked at: open and locked (the lock goes with the descriptor).
struct Candidate {
  PrunedRecord record;
  int fd = -1;
};

system_clock::time_point modified(const fs::path& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0)
    return system_clock::time_point{};
  return system_clock::time_point{std::chrono::seconds(info.st_mtim.tv_sec)};
}

// When the job finished: result.json was written last; a record without one (its
// runner died and recovery wrote none) counts from its events.
system_clock::time_point finished_at(const fs::path& dir) {
  for (const char* name : {"result.json", "events.jsonl"})
    if (std::error_code ec; fs::exists(dir / name, ec))
      return modified(dir / name);
  return modified(dir);
}

uint64_t bytes_under(const fs::path& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::end(it); it.increment(ec))
    if (std::error_code sec; it->is_regular_file(sec))
      total += it->file_size(sec);
  return total;
}

// Removes the record while its lock is held: moved aside first (one rename), so
// nothing ever sees a half-removed record under its id.
Result<void> remove_locked(const fs::path& state_dir, const PrunedRecord& record) {
  const fs::path doomed = state_dir / (".pruned-" + record.job_id + "-" + std::to_string(::getpid()));
  if (::rename(record.dir.c_str(), doomed.c_str()) != 0)
    return fail(errno_message("cannot move " + record.dir.string() + " aside to remove it", errno));
  std::error_code ec;
  fs::remove_all(doomed, ec);
  if (ec)
    return fail("cannot remove " + doomed.string() + ": " + ec.message());
  return {};
}

}  // namespace

Result<std::chrono::seconds> parse_age(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() && std::isdigit(static_cast<unsigned char>(text[digits]))) ++digits;
  const std::string unit = text.substr(digits);
  static const std::pair<const char*, long long> units[] = {
    {"s", 1}, {"m", 60}, {"h", 3600}, {"d", 86400}, {"w", 7 * 86400}};
  auto found = std::find_if(std::begin(units), std::end(units),
                            [&](const auto& u) { return unit == u.first; });
  if (digits == 0 || digits > 9 || found == std::end(units))
    return fail("age \"" + text + "\": expected a whole number and a unit s, m, h, d or w "
                "(e.g. 7d, 12h)");
  return std::chrono::seconds(std::stoll(text.substr(0, digits)) * found->second);
}

Result<PruneReport> prune_job_records(const fs::path& state_dir, const PruneRule& rule) {
  if (rule.older_than.has_value() == rule.keep.has_value())
    return fail("prune needs exactly one of --older-than and --keep");
  PruneReport report;
  const fs::path jobs = state_dir / "jobs";
  std::error_code ec;
  if (!fs::exists(jobs, ec))
    return report;
  std::vector<Candidate> finished;
  auto release = [&] {
    for (auto& c : finished)
      if (c.fd >= 0) ::close(c.fd);
  };
  for (auto it = fs::directory_iterator(jobs, ec); !ec && it != fs::end(it); it.increment(ec)) {
    const std::string id = it->path().filename().string();
    if (id.empty() || id.front() == '.' || !it->is_directory())
      continue;
    int fd = ::open(it->path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
      continue;  // gone meanwhile
    // Held by its runner: a live job. run/<id> left: recovery comes first.
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0 || fs::exists(state_dir / "run" / id, ec)) {
      ::close(fd);
      report.kept_live.push_back(id);
      continue;
    }
    finished.push_back({{id, it->path(), finished_at(it->path()), bytes_under(it->path())}, fd});
  }
  if (ec) {
    release();
    return fail("cannot list " + jobs.string() + ": " + ec.message());
  }
  // Newest first: --keep keeps the front.
  std::sort(finished.begin(), finished.end(), [](const Candidate& a, const Candidate& b) {
    return a.record.finished != b.record.finished ? a.record.finished > b.record.finished
                                                  : a.record.job_id > b.record.job_id;
  });
  const auto now = system_clock::now();
  std::optional<Error> problem;
  for (size_t i = 0; i < finished.size(); ++i) {
    const auto& record = finished[i].record;
    const bool goes = rule.keep ? i >= *rule.keep : now - record.finished > *rule.older_than;
    if (!goes)
      continue;
    if (!rule.dry_run)
      if (auto removed = remove_locked(state_dir, record); !removed) {
        problem = removed.error();
        break;
      }
    report.removed.push_back(record);
  }
  release();
  if (problem)
    return tl::unexpected(*problem);
  std::reverse(report.removed.begin(), report.removed.end());
  return report;
}

}  // namespace solstice
