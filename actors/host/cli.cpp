#include "actors/host/cli.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "actors/host/cluster_cli.hpp"
#include "actors/host/image_cli.hpp"
#include "actors/host/jobs_cli.hpp"
#include "actors/host/metrics_server.hpp"
#include "actors/host/prune_cli.hpp"
#include "actors/host/runner_host.hpp"
#include "actors/host/template_cli.hpp"
#include "runtime/base/clock.hpp"
#include "runtime/base/logging.hpp"
#include "runtime/base/metrics.hpp"
#include "runtime/base/version.hpp"
#include "runtime/job/event_log.hpp"
#include "runtime/job/job_file.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/image_cache.hpp"
#include "runtime/vm/recovery.hpp"

namespace solstice {

namespace {

namespace fs = std::filesystem;

struct CommonOptions {
  std::string config_file;
  std::string state_dir;
  std::string accel;
};

void add_common_options(CLI::App& app, CommonOptions& common) {
  app.add_option("--config", common.config_file,
                 std::string("runner configuration (protobuf JSON of RunnerConfig: state_dir, "
                             "accel, images with their runs_on labels, timeouts; default: ") +
                   default_config_file() + " when it exists)");
  app.add_option("--state-dir", common.state_dir,
                 "where job records and VM work files live (default: /var/lib/solstice-runner "
                 "as root, else ~/.local/state/solstice-runner)");
  app.add_option("--accel", common.accel, "accelerator: auto (KVM, else TCG), kvm or tcg")
    ->check(CLI::IsMember({"auto", "kvm", "tcg"}));
}

Result<v1::RunnerConfig> load_config(const CommonOptions& common) {
  return load_effective_config(common.config_file, common.state_dir, common.accel);
}

struct RunOptions {
  std::vector<std::string> job_files;
  std::string image;
  std::string runs_on;
  std::string script_file;
  unsigned vcpus = 0;
  unsigned memory_mib = 0;
  unsigned timeout_seconds = 0;
  bool debug_on_failure = false;
  bool json = false;
  bool console = false;
  bool replace = false;
  bool cold = false;
  std::string metrics_listen;
};

// The job of `job_file` (or, when it is empty, of the quick form), with the
// command line's overrides applied.
Result<v1::JobSpec> job_from_options(const RunOptions& run, const std::string& job_file) {
  v1::JobSpec job;
  if (!job_file.empty()) {
    if (!run.image.empty() || !run.script_file.empty())
      return fail("give either a job file or --image/--runs-on with --script, not both");
    auto loaded = load_job_file(job_file);
    if (!loaded)
      return tl::unexpected(loaded.error());
    job = *loaded;
    if (!run.runs_on.empty()) {
      job.clear_image();
      job.set_runs_on(run.runs_on);
    }
  } else {
    if (run.script_file.empty())
      return fail("nothing to run: give a job file, or --script FILE with --image IMAGE or "
                  "--runs-on LABEL (see --help)");
    auto script = read_small_file(run.script_file);
    if (!script)
      return tl::unexpected(script.error());
    if (!run.image.empty())
      job.set_image(fs::absolute(run.image).string());
    else
      job.set_runs_on(run.runs_on.empty() ? test_guest_label : run.runs_on);
    job.set_name(fs::path(run.script_file).filename().string());
    auto* step = job.add_steps();
    step->set_name(fs::path(run.script_file).filename().string());
    step->set_script(*script);
  }
  if (run.vcpus)
    job.set_vcpus(run.vcpus);
  if (run.memory_mib)
    job.set_memory_mib(run.memory_mib);
  if (run.timeout_seconds)
    job.set_timeout_seconds(run.timeout_seconds);
  if (run.debug_on_failure)
    job.mutable_debug_on_failure()->set_enabled(true);
  return job;
}

// Loads and checks one job; an error says what is wrong (naming `job_file` when
// `name_file` is set: with several files the user must know which one).
Result<v1::JobSpec> checked_job(const RunOptions& run, const std::string& job_file,
                                v1::RunnerConfig& config, bool name_file) {
  auto job = job_from_options(run, job_file);
  if (!job)
    return job;  // a file's own errors name it already
  const std::string where = name_file ? job_file + ": " : "";
  // A configured image with a url is pulled the first time a job runs on it.
  if (auto pulled = pull_if_missing(config, job->runs_on(), isatty(STDERR_FILENO) && !run.json); !pulled)
    return fail(where + pulled.error().message);
  if (auto ok = validate_job(*job, config); !ok)
    return fail(where + "the job is not valid:\n" + ok.error().message);
  if (auto image = resolve_image(*job, config); !image)
    return fail(where + image.error().message);
  return job;
}

// Invalid input, said on stderr; with --json also as an error event on stdout,
// so a consumer of the JSON stream learns why no job ran.
void print_json_error(const std::string& message, const std::string& job_id = {}) {
  v1::JobEvent event;
  event.set_job_id(job_id);
  event.set_timestamp_us(unix_now_us());
  event.mutable_error()->set_message("invalid input: " + message);
  std::printf("%s\n", event_to_json_line(event).c_str());
  std::fflush(stdout);
}

void report_invalid(bool json, const std::string& message, const std::string& job_id = {}) {
  log_job(spdlog::level::err, job_id, "{}", message);
  if (json)
    print_json_error(message, job_id);
}

int run_command(const CommonOptions& common, const RunOptions& run) {
  auto config = load_config(common);
  if (!config) {
    report_invalid(run.json, config.error().message);
    return exit_invalid_input;
  }
  if (run.cold)
    config->set_snapshots("off");
  // Every job is checked before any starts: one bad file runs nothing.
  std::vector<std::string> files = run.job_files;
  if (files.empty())
    files.push_back("");  // the quick form
  const bool several = files.size() > 1;
  std::vector<v1::JobSpec> jobs;
  bool all_valid = true;
  for (const auto& file : files) {
    auto job = checked_job(run, file, *config, several);
    if (!job) {
      report_invalid(run.json, job.error().message);
      all_valid = false;
      continue;
    }
    jobs.push_back(std::move(*job));
  }
  if (!all_valid)
    return exit_invalid_input;
  // Two jobs with one id would share one record directory.
  for (size_t i = 0; i < jobs.size(); ++i)
    for (size_t k = 0; k < i; ++k)
      if (!jobs[i].id().empty() && jobs[i].id() == jobs[k].id()) {
        report_invalid(run.json,
                       files[k] + " and " + files[i] + " both have the job id \"" +
                         jobs[i].id() +
                         "\"; the jobs of one run need different ids (or none: one is made "
                         "for each)",
                       jobs[i].id());
        return exit_invalid_input;
      }
  // Whatever a runner that died left in this state directory is cleaned first.
  if (auto recovered = recover_abandoned_jobs(*config); !recovered)
    spdlog::warn("recovery skipped: {}", recovered.error().message);
  else
    for (const auto& job : *recovered)
      log_job(spdlog::level::info, job.job_id, "{}", job.description);
  metrics().set_slots(config->max_concurrent_vms());
  auto metrics_server = MetricsServer::start_if_asked(run.metrics_listen);
  if (!metrics_server) {
    report_invalid(run.json, metrics_server.error().message);
    return exit_invalid_input;
  }
  LocalRunOptions options;
  options.json = run.json;
  options.show_console = run.console;
  options.replace = run.replace;
  return run_jobs_locally(std::move(jobs), *config, options);
}

// CLI11 answers a missing or unknown command with "A subcommand is required";
// this says which word is wrong and what the commands are: of `app` when `word`
// (argv[index]) is its command, or of `solstice-runner jobs` and the like.
// nullopt: the word is fine.
std::optional<int> check_command(const CLI::App& app, const std::string& program, int index,
                                 int argc, char** argv) {
  std::string commands;
  bool known = false;
  for (const auto* command : app.get_subcommands({})) {
    auto name = command->get_name();
    auto description = command->get_description();
    name.resize(std::max<size_t>(name.size(), 12), ' ');
    commands += "\n  " + name + description.substr(0, description.find(" ("));
    known |= argc > index && command->get_name() == argv[index];
  }
  if (known || (argc > index && argv[index][0] == '-'))
    return std::nullopt;  // a command, or an option such as --help and --version
  if (argc > index)
    std::fprintf(stderr, "%s: unknown command \"%s\"; the commands are:%s\n", program.c_str(),
                 argv[index], commands.c_str());
  else
    std::fprintf(stderr, "%s: a command is required:%s\n", program.c_str(), commands.c_str());
  std::fprintf(stderr, "(%s COMMAND --help for one command's options)\n", program.c_str());
  return exit_invalid_input;
}

// The commands that have commands of their own (`jobs list`, ...) get the same help.
std::optional<int> check_commands(CLI::App& app, int argc, char** argv) {
  if (auto wrong = check_command(app, "solstice-runner", 1, argc, argv))
    return wrong;
  if (argc < 2 || argv[1][0] == '-')
    return std::nullopt;
  const auto* command = app.get_subcommand(argv[1]);
  if (command->get_subcommands({}).empty())
    return std::nullopt;
  return check_command(*command, std::string("solstice-runner ") + argv[1], 2, argc, argv);
}

// --log-level and --log-format on `app` and each of its commands, all the way down.
void add_logging_options(CLI::App& app, std::string& level, std::string& format) {
  app.add_option("--log-level", level,
                 "diagnostics from this level on: trace, debug, info (default), warn, error, off")
    ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));
  app.add_option("--log-format", format,
                 "diagnostics as text (default) or json (one JSON object per line)")
    ->check(CLI::IsMember({"text", "json"}));
  for (auto* command : app.get_subcommands({}))
    add_logging_options(*command, level, format);
}

// Whether argv asks for JSON output (the flag is --json wherever it is given).
bool wants_json(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--json")
      return true;
  return false;
}

}  // namespace

int run_cli(int argc, char** argv) {
  CLI::App app{"Solstice Runner: runs CI jobs, each in a fresh throw-away QEMU VM"};
  app.require_subcommand(1);
  app.set_version_flag("--version", runner_version_text(),
                       "print the version and the git commit it was built from");
  app.footer(
    "Exit codes of `run`: 0 success; a failing step's own exit code (128+N when it died by "
    "signal N); 124 timed out; 130 cancelled; 125 infrastructure error; 2 invalid input. "
    "With several job files: 0 when every job succeeded, else the code of the first job "
    "(in command-line order) that did not.");

  CommonOptions common;
  RunOptions run;
  auto* run_app = app.add_subcommand(
    "run", "run jobs, each in a fresh VM, and stream their output (several job files run "
           "at once in one process, as many VMs at a time as max_concurrent_vms allows)");
  add_common_options(*run_app, common);
  run_app->add_option("jobs", run.job_files,
                      "job files (job.json: protobuf JSON of JobSpec); several run at once, "
                      "each output line prefixed with its job's name")
    ->check(CLI::ExistingFile);
  run_app->add_option("--image", run.image, "quick form: base image (qcow2 or raw) to boot");
  run_app->add_option("--runs-on", run.runs_on,
                      "image label from the configuration (default for the quick form: "
                      "solstice-test-guest, the built-in test guest)");
  run_app->add_option("--script", run.script_file, "quick form: shell script to run as one step")
    ->check(CLI::ExistingFile);
  run_app->add_option("--vcpus", run.vcpus, "virtual CPUs (overrides the image's)");
  run_app->add_option("--memory", run.memory_mib, "memory in MiB (overrides the image's)");
  run_app->add_option("--timeout", run.timeout_seconds, "job timeout in seconds");
  run_app->add_flag("--debug-on-failure", run.debug_on_failure,
                    "keep a failed VM up for a while and print how to get in");
  run_app->add_flag("--json", run.json, "print every job event as one JSON line");
  run_app->add_flag("--console", run.console, "show the guest's serial console while it boots");
  run_app->add_flag("--cold", run.cold,
                    "boot every VM cold, never from a template (as snapshots: off does)");
  run_app->add_flag("--replace", run.replace,
                    "run a job whose id has a record already, removing that record first (a "
                    "job id in use by a running job is refused all the same)");

  run_app->add_option("--metrics-listen", run.metrics_listen,
                      "HOST:PORT to serve Prometheus metrics (/metrics) and /healthz on while "
                      "the jobs run (e.g. 127.0.0.1:9464; port 0: any free port, logged)");

  std::optional<int> cluster_exit;
  add_cluster_commands(app, cluster_exit);
  std::optional<int> jobs_exit;
  add_jobs_commands(app, jobs_exit);
  std::optional<int> image_exit;
  add_image_commands(app, image_exit);
  std::optional<int> prune_exit;
  add_prune_command(app, prune_exit);
  std::optional<int> template_exit;
  add_template_commands(app, template_exit);

  // Diagnostics (not the jobs' output): on the program and on every command.
  std::string log_level = "info", log_format = "text";
  add_logging_options(app, log_level, log_format);
  app.parse_complete_callback([&] { (void)configure_logging(log_level, log_format); });
  (void)configure_logging(log_level, log_format);

  if (auto wrong = check_commands(app, argc, argv))
    return *wrong;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    auto code = app.exit(e);
    if (code != 0 && wants_json(argc, argv))
      print_json_error(e.what());  // app.exit() has said it on stderr
    return code == 0 ? 0 : exit_invalid_input;
  }
  if (cluster_exit)
    return *cluster_exit;
  if (jobs_exit)
    return *jobs_exit;
  if (image_exit)
    return *image_exit;
  if (prune_exit)
    return *prune_exit;
  if (template_exit)
    return *template_exit;
  if (run_app->parsed())
    return run_command(common, run);
  return exit_invalid_input;
}

}  // namespace solstice
