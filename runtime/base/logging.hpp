#pragma once
// The runner's diagnostics (not a job's output: that is the event stream) go
// through spdlog to stderr, as text ("solstice-runner: warning: ...") or as one
// JSON object per line (--log-format json: time, level, message, job_id). A line
// about a job is logged with log_job, which puts the job's id on it.
#include <string>

#include <spdlog/spdlog.h>

#include "runtime/base/error.hpp"

namespace solstice {

// level: trace, debug, info, warn, error or off; format: text or json.
Result<void> configure_logging(const std::string& level, const std::string& format);

namespace logging_detail {
// The job the line being logged on this thread is about (null: none).
extern thread_local const std::string* current_job_id;
}  // namespace logging_detail

template <class... Args>
void log_job(spdlog::level::level_enum level, const std::string& job_id,
             spdlog::format_string_t<Args...> format, Args&&... args) {
  logging_detail::current_job_id = &job_id;
  spdlog::log(level, format, std::forward<Args>(args)...);
  logging_detail::current_job_id = nullptr;
}

}  // namespace solstice
