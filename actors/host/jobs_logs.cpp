#include "actors/host/jobs_logs.hpp"

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include <spdlog/spdlog.h>

#include "actors/sinks/terminal_printer.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/job/event_log.hpp"

namespace solstice {

namespace {

constexpr std::chrono::milliseconds follow_poll{200};

void write_all(int fd, const std::string& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    auto n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return;  // a closed pipe: nothing more to show
    done += static_cast<size_t>(n);
  }
}

struct Replay {
  const LogsOptions& options;
  bool at_line_start = true;  // of stdout, so our own lines start on a line of their own
  bool has_result = false;

  bool wanted_step(uint32_t index) const {
    return options.step == 0 || index + 1 == options.step;
  }

  void line(const std::string& text) {
    write_all(STDOUT_FILENO, (at_line_start ? "" : "\n") + text + "\n");
    at_line_start = true;
  }

  void output(const v1::OutputChunk& chunk) {
    const auto& data = chunk.data();
    if (chunk.stream() == v1::STDERR) {
      write_all(STDERR_FILENO, data);
      return;
    }
    write_all(STDOUT_FILENO, data);
    if (!data.empty())
      at_line_start = data.back() == '\n';
  }

  // Whether the event belongs to what was asked for (--step).
  bool selected(const v1::JobEvent& event) const {
    switch (event.kind_case()) {
      case v1::JobEvent::kOutput: return wanted_step(event.output().step_index());
      case v1::JobEvent::kStepStarted: return wanted_step(event.step_started().step_index());
      case v1::JobEvent::kStepFinished: return wanted_step(event.step_finished().step_index());
      default: return options.step == 0;
    }
  }

  void show(const v1::JobEvent& event) {
    has_result |= event.has_result();
    if (!selected(event))
      return;
    if (options.json)
      return write_all(STDOUT_FILENO, event_to_json_line(event) + "\n");
    if (event.has_output())
      return output(event.output());
    if (options.raw)
      return;
    switch (event.kind_case()) {
      case v1::JobEvent::kStepStarted:
        line("==> step " + std::to_string(event.step_started().step_index() + 1) + ": " +
             event.step_started().name());
        break;
      case v1::JobEvent::kStepFinished: line(step_finished_text(event.step_finished())); break;
      case v1::JobEvent::kError: line("error: " + event.error().message()); break;
      case v1::JobEvent::kNotice: line("note: " + event.notice().message()); break;
      case v1::JobEvent::kResult:
        write_all(STDOUT_FILENO, (at_line_start ? "\n" : "\n\n") + format_summary(event.result()));
        at_line_start = true;
        break;
      default: break;  // states and console lines are the boot's, not the output
    }
  }
};

// Shows what the log holds now, to its end. False (with a message) when it
// cannot be read.
bool show_available(EventFollower& follower, Replay& replay) {
  do {
    auto events = follower.read_new();
    if (!events) {
      spdlog::error("{}", events.error().message);
      return false;
    }
    for (const auto& event : *events)
      replay.show(event);
  } while (!follower.at_end());
  return true;
}

}  // namespace

int replay_job_log(const JobRecordInfo& job, const LogsOptions& options) {
  EventFollower follower(job.dir / "events.jsonl");
  Replay replay{options};
  if (!show_available(follower, replay))
    return 1;
  while (options.follow && !replay.has_result) {
    // Checked before the last read: a runner that wrote its result and exited
    // meanwhile is read to the end first.
    const bool alive = job_runner_alive(job.dir);
    std::this_thread::sleep_for(follow_poll);
    if (!show_available(follower, replay))
      return 1;
    if (!alive && !replay.has_result) {
      log_job(spdlog::level::err, job.job_id,
              "the runner of job {} is gone and its log ends without a result (it is recorded "
              "when a runner next starts with this state directory)",
              job.job_id);
      return 1;
    }
  }
  return 0;
}

}  // namespace solstice
