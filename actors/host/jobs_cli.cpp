#include "actors/host/jobs_cli.hpp"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <string>
#include <thread>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "actors/host/jobs_logs.hpp"
#include "actors/host/runner_host.hpp"
#include "actors/sinks/terminal_printer.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_records.hpp"
#include "runtime/job/job_result.hpp"

namespace solstice {

namespace {

using json = nlohmann::ordered_json;  // "v" first, as in the events
namespace fs = std::filesystem;

constexpr int exit_not_now = 1;  // the job is not in a state for the command

struct JobsOptions {
  std::string config_file;
  std::string state_dir;
  bool json = false;
  std::string id;
  unsigned cancel_wait_seconds = 120;
  LogsOptions logs;
};

// An error for the user: on stderr, and with --json also as a JSON line on stdout.
int report_error(const JobsOptions& options, const std::string& message, int code) {
  spdlog::error("{}", message);
  if (options.json)
    std::printf("%s\n",
                json{{"v", event_format_version}, {"error", {{"message", message}}}}.dump().c_str());
  return code;
}

// "2025-01-31 12:00:03" in local time, "-" for 0.
std::string time_text(int64_t unix_us) {
  if (unix_us <= 0)
    return "-";
  std::time_t seconds = static_cast<std::time_t>(unix_us / 1000000);
  std::tm local{};
  localtime_r(&seconds, &local);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", &local);
  return buf;
}

// How long the job ran, or has run so far.
int64_t duration_ms(const JobRecordInfo& job) {
  if (job.started_at_us <= 0)
    return 0;
  int64_t end = job.ended_at_us > 0 ? job.ended_at_us : job.state == "running" ? unix_now_us() : 0;
  return end > job.started_at_us ? (end - job.started_at_us) / 1000 : 0;
}

std::string duration_text(int64_t ms) {
  char buf[32];
  if (ms < 60 * 1000)
    std::snprintf(buf, sizeof buf, "%.1fs", static_cast<double>(ms) / 1000.0);
  else if (ms < 3600 * 1000)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(ms / 60000),
                  static_cast<long long>(ms / 1000 % 60));
  else
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(ms / 3600000),
                  static_cast<long long>(ms / 60000 % 60));
  return buf;
}

std::string name_of(const JobRecordInfo& job) {
  return job.started && !job.started->name().empty() ? job.started->name() : "-";
}

// The job as one JSON object: what `list` prints per line and `show` starts with.
json job_json(const JobRecordInfo& job) {
  json out{{"v", event_format_version},
           {"job_id", job.job_id},
           {"name", job.started ? job.started->name() : ""},
           {"state", job.state},
           {"exit_code", job.result ? json(exit_code_for(*job.result)) : json(nullptr)},
           {"started_at_us", job.started_at_us},
           {"ended_at_us", job.ended_at_us},
           {"duration_ms", duration_ms(job)},
           {"runner_pid", job.runner_pid},
           {"record", job.dir.string()}};
  return out;
}

Result<fs::path> state_dir_of(const JobsOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return tl::unexpected(config.error());
  return fs::path(config->state_dir());
}

int list_command(const JobsOptions& options) {
  auto state_dir = state_dir_of(options);
  if (!state_dir)
    return report_error(options, state_dir.error().message, exit_invalid_input);
  auto jobs = list_job_records(*state_dir);
  if (!jobs)
    return report_error(options, jobs.error().message, exit_invalid_input);
  if (options.json) {
    for (const auto& job : *jobs)
      std::printf("%s\n", job_json(job).dump().c_str());
    return 0;
  }
  if (jobs->empty()) {
    std::printf("no jobs in %s\n", (*state_dir / "jobs").c_str());
    return 0;
  }
  std::printf("%-24s %-21s %-5s %-19s %-9s %s\n", "ID", "STATE", "EXIT", "STARTED", "DURATION",
              "NAME");
  for (const auto& job : *jobs)
    std::printf("%-24s %-21s %-5s %-19s %-9s %s\n", job.job_id.c_str(), job.state.c_str(),
                job.result ? std::to_string(exit_code_for(*job.result)).c_str() : "-",
                time_text(job.started_at_us).c_str(), duration_text(duration_ms(job)).c_str(),
                name_of(job).c_str());
  return 0;
}

Result<JobRecordInfo> find_job(const JobsOptions& options) {
  auto state_dir = state_dir_of(options);
  if (!state_dir)
    return tl::unexpected(state_dir.error());
  return find_job_record(*state_dir, options.id);
}

int show_command(const JobsOptions& options) {
  auto job = find_job(options);
  if (!job)
    return report_error(options, job.error().message, exit_invalid_input);
  if (options.json) {
    auto out = job_json(*job);
    if (job->started)
      out["job_started"] = json::parse(message_to_json(*job->started));
    if (job->result)
      out["result"] = json::parse(message_to_json(*job->result));
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::string text = "job " + job->job_id + ": " + name_of(*job) + "\n";
  if (job->started)
    text += "  runs on: " + (job->started->runs_on().empty() ? "-" : job->started->runs_on()) +
            " (image " + job->started->image() + ")\n  runner: " + job->started->host() +
            ", solstice-runner " + job->started->runner_version() + " (commit " +
            job->started->runner_commit() + "), pid " + std::to_string(job->runner_pid) + "\n";
  text += "  state: " + job->state + "\n  started: " + time_text(job->started_at_us) +
          (job->ended_at_us ? ", ended: " + time_text(job->ended_at_us) : std::string()) +
          ", " + duration_text(duration_ms(*job)) + "\n  record: " + job->dir.string() + "\n";
  if (job->result)
    text += "\n" + format_summary(*job->result);
  else if (job->state == "running")
    text += "\nstill running; follow it with: solstice-runner jobs logs " + job->job_id +
            " --follow\n";
  std::fputs(text.c_str(), stdout);
  return 0;
}

int logs_command(const JobsOptions& options) {
  auto job = find_job(options);
  if (!job)
    return report_error(options, job.error().message, exit_invalid_input);
  auto logs = options.logs;
  logs.json = options.json;
  return replay_job_log(*job, logs);
}

int cancel_command(const JobsOptions& options) {
  auto job = find_job(options);
  if (!job)
    return report_error(options, job.error().message, exit_invalid_input);
  const auto& id = job->job_id;
  if (job->result)
    return report_error(options, "job " + id + " has already ended (" + job->state + ")",
                        exit_not_now);
  if (job->state != "running")
    return report_error(options,
                        "job " + id + " has no result, but the process that ran it (pid " +
                          std::to_string(job->runner_pid) +
                          ") is gone: nothing runs it any more (its record is completed when "
                          "a runner next starts with this state directory)",
                        exit_not_now);
  if (auto ok = request_cancel(job->dir); !ok)
    return report_error(options, ok.error().message, exit_invalid_input);
  if (!options.json)
    std::printf("cancel requested for job %s (runner pid %d)\n", id.c_str(), job->runner_pid);
  std::fflush(stdout);
  if (options.cancel_wait_seconds == 0) {
    if (options.json)
      std::printf("%s\n", job_json(*job).dump().c_str());
    return 0;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(options.cancel_wait_seconds);
  JobRecordInfo now = *job;
  while (!now.result && now.state == "running" && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    now = read_job_record(job->dir);
  }
  if (options.json)
    std::printf("%s\n", job_json(now).dump().c_str());
  if (!now.result)
    return report_error(options,
                        now.state == "running"
                          ? "job " + id + " has not ended within " +
                              std::to_string(options.cancel_wait_seconds) +
                              " s of the cancel request (its VM may still be powering down)"
                          : "the runner of job " + id + " ended without recording a result",
                        exit_not_now);
  if (!options.json)
    std::printf("job %s %s (exit code %d)\n", id.c_str(), now.state.c_str(),
                exit_code_for(*now.result));
  return now.result->status() == v1::CANCELLED ? 0 : exit_not_now;
}

CLI::App* add_job_subcommand(CLI::App& jobs, const std::string& name, const std::string& help,
                             const std::shared_ptr<JobsOptions>& options) {
  auto* app = jobs.add_subcommand(name, help);
  app->add_option("--config", options->config_file,
                  "runner configuration (its state_dir is where the records are)");
  app->add_option("--state-dir", options->state_dir, "the state directory to look in");
  app->add_flag("--json", options->json, "one JSON object per line, each with \"v\": 1");
  return app;
}

}  // namespace

void add_jobs_commands(CLI::App& app, std::optional<int>& exit_code) {
  auto options = std::make_shared<JobsOptions>();
  auto* jobs = app.add_subcommand("jobs", "look at the job records of this host, follow a job's "
                                          "output, cancel a running job");
  jobs->require_subcommand(1);

  auto* list = add_job_subcommand(*jobs, "list", "every job: state, exit code, start, duration, "
                                                  "name (oldest first)", options);
  list->callback([&exit_code, options] { exit_code = list_command(*options); });

  auto* show = add_job_subcommand(*jobs, "show", "one job and its summary table", options);
  show->add_option("id", options->id, "job id (or its unique start or end)")->required();
  show->callback([&exit_code, options] { exit_code = show_command(*options); });

  auto* logs = add_job_subcommand(*jobs, "logs", "a job's output, replayed from its record",
                                  options);
  logs->add_option("id", options->id, "job id (or its unique start or end)")->required();
  logs->add_option("--step", options->logs.step, "only step N (1 = the first, as in the table)")
    ->check(CLI::PositiveNumber);
  logs->add_flag("--raw", options->logs.raw,
                 "only the steps' bytes, exactly as written (stdout to stdout, stderr to stderr)");
  logs->add_flag("--follow,-f", options->logs.follow,
                 "keep showing a running job's output until it ends");
  logs->callback([&exit_code, options] { exit_code = logs_command(*options); });

  auto* cancel = add_job_subcommand(
    *jobs, "cancel", "cancel a job that another solstice-runner process on this host runs",
    options);
  cancel->add_option("id", options->id, "job id (or its unique start or end)")->required();
  cancel->add_option("--wait", options->cancel_wait_seconds,
                     "seconds to wait for the job to end (default 120; 0: do not wait)");
  cancel->callback([&exit_code, options] { exit_code = cancel_command(*options); });
}

}  // namespace solstice
