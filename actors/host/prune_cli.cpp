#include "actors/host/prune_cli.hpp"

#include <cstdio>
#include <ctime>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>

#include "actors/host/runner_host.hpp"
#include "runtime/job/disk_limits.hpp"
#include "runtime/job/job_prune.hpp"

namespace solstice {

namespace {

struct PruneOptions {
  std::string config_file;
  std::string state_dir;
  std::string older_than;
  std::optional<unsigned> keep;
  bool dry_run = false;
};

std::string local_time(std::chrono::system_clock::time_point when) {
  std::time_t seconds = std::chrono::system_clock::to_time_t(when);
  std::tm local{};
  localtime_r(&seconds, &local);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%d %H:%M:%S", &local);
  return text;
}

int prune_command(const PruneOptions& options) {
  auto refuse = [](const std::string& message, int code) {
    std::fprintf(stderr, "solstice-runner prune: %s\n", message.c_str());
    return code;
  };
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return refuse(config.error().message, exit_invalid_input);
  PruneRule rule;
  rule.dry_run = options.dry_run;
  rule.keep = options.keep;
  if (!options.older_than.empty()) {
    auto age = parse_age(options.older_than);
    if (!age)
      return refuse("--older-than " + age.error().message, exit_invalid_input);
    rule.older_than = *age;
  }
  if (rule.older_than.has_value() == rule.keep.has_value())
    return refuse("give exactly one of --older-than AGE and --keep N", exit_invalid_input);
  auto report = prune_job_records(config->state_dir(), rule);
  if (!report)
    return refuse(report.error().message, exit_infrastructure_error);
  const char* verb = options.dry_run ? "would remove" : "removed";
  uint64_t total = 0;
  for (const auto& record : report->removed) {
    std::printf("%s %s (finished %s, %s)\n", verb, record.dir.c_str(),
                local_time(record.finished).c_str(), bytes_text(record.bytes).c_str());
    total += record.bytes;
  }
  for (const auto& id : report->kept_live)
    std::printf("kept %s: running, or its VM files await recovery\n", id.c_str());
  std::printf("%s %zu job record%s, %s\n", verb, report->removed.size(),
              report->removed.size() == 1 ? "" : "s", bytes_text(total).c_str());
  return 0;
}

}  // namespace

void add_prune_command(CLI::App& app, std::optional<int>& exit_code) {
  auto options = std::make_shared<PruneOptions>();
  auto* prune = app.add_subcommand(
    "prune", "remove finished job records by age or count (never a running job's)");
  prune->add_option("--config", options->config_file,
                    "runner configuration (its state_dir is where the records are)");
  prune->add_option("--state-dir", options->state_dir, "the state directory to prune");
  auto* older = prune->add_option("--older-than", options->older_than,
                                  "remove records of jobs that finished longer ago than AGE "
                                  "(a number and s, m, h, d or w: 7d)");
  auto* keep = prune->add_option("--keep", options->keep,
                                 "keep the N most recently finished records, remove the rest");
  older->excludes(keep);
  prune->add_flag("--dry-run", options->dry_run, "print what would be removed, remove nothing");
  prune->callback([&exit_code, options] { exit_code = prune_command(*options); });
}

}  // namespace solstice
