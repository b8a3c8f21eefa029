#include "runtime/job/job_records.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <fstream>
#include <iterator>
#include <tuple>

#include <google/protobuf/util/json_util.h>

#include "runtime/base/child_process.hpp"
#include "runtime/base/proc_stat.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/vm/recovery.hpp"

namespace solstice {

namespace fs = std::filesystem;

namespace {

std::string read_whole(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
}

std::optional<v1::JobResult> read_result(const fs::path& dir) {
  auto text = read_whole(dir / "result.json");
  if (text.empty())
    return std::nullopt;
  v1::JobResult result;
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;  // a record written by a newer runner
  if (!google::protobuf::util::JsonStringToMessage(text, &result, options).ok())
    return std::nullopt;
  return result;
}

// The first event of the log: job_started in records of this runner version.
std::optional<v1::JobEvent> first_event(const fs::path& dir) {
  std::ifstream file(dir / "events.jsonl", std::ios::binary);
  std::string line;
  if (!std::getline(file, line) || file.eof())  // no newline yet: still being written
    return std::nullopt;
  auto event = event_from_json_line(line);
  return event ? std::optional<v1::JobEvent>(std::move(*event)) : std::nullopt;
}

}  // namespace

std::string status_name(v1::JobStatus status) {
  if (status == v1::JOB_STATUS_UNSPECIFIED)
    return "unknown";
  auto name = v1::JobStatus_Name(status);
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return name;
}

Result<void> write_job_owner(const fs::path& job_dir, const std::string& job_id) {
  OwnerRecord record;
  record.runner_pid = ::getpid();
  record.runner_start_time = process_start_time(record.runner_pid).value_or(0);
  record.job_id = job_id;
  record.job_dir = job_dir.string();
  return write_owner_record(job_dir, record);
}

bool job_runner_alive(const fs::path& job_dir) {
  auto owner = read_owner_record(job_dir);
  return owner && owner->runner_pid > 0 && process_running(owner->runner_pid) &&
         process_start_time(owner->runner_pid) == owner->runner_start_time;
}

JobRecordInfo read_job_record(const fs::path& dir) {
  JobRecordInfo info;
  info.dir = dir;
  info.job_id = dir.filename().string();
  if (auto first = first_event(dir)) {
    info.started_at_us = first->timestamp_us();
    if (first->has_job_started())
      info.started = first->job_started();
  }
  if (auto owner = read_owner_record(dir))
    info.runner_pid = owner->runner_pid;
  info.result = read_result(dir);
  if (info.result) {
    info.state = status_name(info.result->status());
    if (info.result->started_at_us())
      info.started_at_us = info.result->started_at_us();
    info.ended_at_us = info.result->ended_at_us();
  } else {
    info.state = job_runner_alive(dir) ? "running" : "abandoned";
  }
  return info;
}

Result<std::vector<JobRecordInfo>> list_job_records(const fs::path& state_dir) {
  std::vector<JobRecordInfo> records;
  const auto jobs = state_dir / "jobs";
  std::error_code ec;
  if (!fs::exists(jobs, ec))
    return records;
  fs::directory_iterator entries(jobs, ec);
  if (ec)
    return fail("cannot read the job records in " + jobs.string() + ": " + ec.message());
  for (const auto& entry : entries)
    if (entry.is_directory(ec))
      records.push_back(read_job_record(entry.path()));
  std::sort(records.begin(), records.end(), [](const auto& a, const auto& b) {
    return std::tie(a.started_at_us, a.job_id) < std::tie(b.started_at_us, b.job_id);
  });
  return records;
}

Result<JobRecordInfo> find_job_record(const fs::path& state_dir, const std::string& id) {
  if (id.empty() || id.find('/') != std::string::npos || id == "." || id == "..")
    return fail("\"" + id + "\" is not a job id (ids are names like 20250101-120000-a1b2c3)");
  std::error_code ec;
  const auto jobs = state_dir / "jobs";
  if (fs::is_directory(jobs / id, ec))
    return read_job_record(jobs / id);
  std::vector<std::string> matches;
  for (const auto& entry : fs::directory_iterator(jobs, ec)) {
    auto name = entry.path().filename().string();
    bool prefix = name.rfind(id, 0) == 0;
    bool suffix = name.size() >= id.size() && name.compare(name.size() - id.size(), id.size(), id) == 0;
    if (prefix || suffix)
      matches.push_back(name);
  }
  if (matches.size() == 1)
    return read_job_record(jobs / matches.front());
  if (matches.empty())
    return fail("no job \"" + id + "\" in " + jobs.string() + " (see `solstice-runner jobs list`)");
  std::sort(matches.begin(), matches.end());
  std::string list;
  for (const auto& match : matches)
    list += " " + match;
  return fail("\"" + id + "\" names several jobs:" + list + "; give more of the id");
}

Result<void> request_cancel(const fs::path& job_dir) {
  const auto path = job_dir / cancel_request_file;
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0)
    return fail(errno_message("cannot write the cancel request " + path.string(), errno));
  ::close(fd);
  return {};
}

bool take_cancel_request(const fs::path& job_dir) {
  // unlink both tests and takes: a request is acted on once.
  return ::unlink((job_dir / cancel_request_file).c_str()) == 0;
}

Result<std::vector<v1::JobEvent>> EventFollower::read_new() {
  std::vector<v1::JobEvent> events;
  std::ifstream file(path_, std::ios::binary);
  if (!file)
    return fail(errno_message("event log " + path_.string() + ": cannot open", errno));
  // A bounded read: a long log is replayed piece by piece, not held whole.
  constexpr size_t max_read = 4 << 20;
  file.seekg(static_cast<std::streamoff>(offset_));
  std::string chunk(max_read, '\0');
  file.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
  chunk.resize(static_cast<size_t>(file.gcount()));
  at_end_ = chunk.size() < max_read;
  offset_ += chunk.size();
  partial_ += chunk;
  size_t start = 0;
  for (size_t end; (end = partial_.find('\n', start)) != std::string::npos; start = end + 1) {
    ++line_number_;
    std::string_view line(partial_.data() + start, end - start);
    if (line.find_first_not_of(" \t\r") == std::string_view::npos)
      continue;
    auto event = event_from_json_line(line);
    if (!event)
      return fail(path_.string() + ":" + std::to_string(line_number_) + ": " + event.error().message);
    events.push_back(std::move(*event));
  }
  partial_.erase(0, start);
  return events;
}

}  // namespace solstice
