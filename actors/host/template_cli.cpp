#include "actors/host/template_cli.hpp"

#include <cstdio>
#include <ctime>
#include <filesystem>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "actors/host/runner_host.hpp"
#include "runtime/job/job_result.hpp"
#include "runtime/job/runner_config.hpp"
#include "runtime/vm/template_build.hpp"
#include "runtime/vm/vm_prepare.hpp"

namespace solstice {

namespace {

constexpr int exit_build_failed = 1;

struct TemplateOptions {
  std::string config_file;
  std::string state_dir;
  std::string accel;
  std::string target;  // build: a label; rm: an id or a label
  std::string image;
  unsigned vcpus = 0;
  unsigned memory_mib = 0;
  bool json = false;
  bool all = false;
};

int report_error(const std::string& message, int code) {
  std::fprintf(stderr, "solstice-runner: %s\n", message.c_str());
  return code;
}

std::string time_text(int64_t unix_us) {
  std::time_t seconds = static_cast<std::time_t>(unix_us / 1000000);
  std::tm local{};
  localtime_r(&seconds, &local);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &local);
  return buf;
}

std::string shape_text(const nlohmann::json& inputs) {
  return std::to_string(inputs.value("vcpus", 0)) + " vcpu " +
         std::to_string(inputs.value("memory_mib", 0)) + " MiB " + inputs.value("accel", std::string{});
}

int build_command(const TemplateOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, options.accel);
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  // The image as a job on it would get it (the same defaults, so the same key).
  v1::JobSpec job;
  if (!options.image.empty())
    job.set_image(std::filesystem::absolute(options.image).string());
  else
    job.set_runs_on(options.target.empty() ? test_guest_label : options.target);
  if (options.vcpus)
    job.set_vcpus(options.vcpus);
  if (options.memory_mib)
    job.set_memory_mib(options.memory_mib);
  auto image = resolve_image(job, *config);
  if (!image)
    return report_error(image.error().message, exit_invalid_input);
  if (auto why = template_unsupported(job, *image); !why.empty())
    return report_error("no template for image '" + image->label() + "': " + why, exit_invalid_input);
  auto accel = resolve_accel(config->accel(), config->kvm_device());
  auto ensured = ensure_template(*image, *config, accel, [&](const TemplateKey& key) {
    std::fprintf(stderr, "building template %s of image '%s' (%s)...\n", key.id.c_str(),
                 image->label().c_str(), shape_text(key.inputs).c_str());
  }, /*retry_failed=*/true);
  if (!ensured)
    return report_error(ensured.error().message, exit_build_failed);
  const auto& info = ensured->info;
  if (ensured->built)
    std::printf("template %s of '%s' built in %.1f s (state %.1f MiB)\n", info.id.c_str(),
                info.label.c_str(), static_cast<double>(info.build_ms) / 1000.0,
                static_cast<double>(info.state_bytes) / (1 << 20));
  else
    std::printf("template %s of '%s' is ready (built %s)\n", info.id.c_str(), info.label.c_str(),
                time_text(info.built_at_us).c_str());
  if (info.identity_agent)
    std::printf("clones take their identity over the virtio-serial identity port\n");
  else
    std::printf("clones take their identity over SSH: %s\n",
                info.identity_note.empty() ? "no identity agent" : info.identity_note.c_str());
  if (info.cloud_init_errors)
    std::printf("cloud-init finished with errors in its guest (each job says so)\n");
  return 0;
}

int list_command(const TemplateOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  auto templates = TemplateStore(config->state_dir()).list();
  if (options.json) {
    for (const auto& t : templates)
      std::printf("%s\n", nlohmann::ordered_json{{"v", 1},
                                                 {"id", t.id},
                                                 {"label", t.label},
                                                 {"inputs", t.inputs},
                                                 {"built_at_us", t.built_at_us},
                                                 {"build_ms", t.build_ms},
                                                 {"state_bytes", t.state_bytes},
                                                 {"stale", t.stale},
                                                 {"identity_agent", t.identity_agent},
                                                 {"identity_note", t.identity_note},
                                                 {"cloud_init_errors", t.cloud_init_errors},
                                                 {"path", t.dir.string()}}
                            .dump()
                            .c_str());
    return 0;
  }
  if (templates.empty()) {
    std::printf("no templates in %s (jobs build them on first use; solstice-runner template "
                "build LABEL builds one now)\n",
                templates_dir(config->state_dir()).c_str());
    return 0;
  }
  std::printf("%-24s %-24s %-22s %9s  %-16s %8s  %s\n", "ID", "LABEL", "SHAPE", "STATE", "BUILT",
              "BUILD", "STATUS");
  for (const auto& t : templates)
    std::printf("%-24s %-24s %-22s %7.1f M  %-16s %7.1fs  %s\n", t.id.c_str(), t.label.c_str(),
                shape_text(t.inputs).c_str(), static_cast<double>(t.state_bytes) / (1 << 20),
                time_text(t.built_at_us).c_str(), static_cast<double>(t.build_ms) / 1000.0,
                t.stale.empty() ? "ready" : ("stale: " + t.stale).c_str());
  return 0;
}

int rm_command(const TemplateOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  if (options.all == !options.target.empty())
    return report_error("template rm: give a template id or an image label, or --all", exit_invalid_input);
  TemplateStore store(config->state_dir());
  int removed = 0;
  for (const auto& t : store.list()) {
    if (!options.all && t.id != options.target && t.label != options.target)
      continue;
    if (auto ok = store.remove(t.id); !ok)
      return report_error(ok.error().message, exit_build_failed);
    std::printf("removed template %s of '%s'\n", t.id.c_str(), t.label.c_str());
    ++removed;
  }
  if (removed == 0 && !options.all)
    return report_error("no template with id or label \"" + options.target + "\"", exit_invalid_input);
  return 0;
}

CLI::App* add_subcommand(CLI::App& parent, const std::string& name, const std::string& help,
                         const std::shared_ptr<TemplateOptions>& options) {
  auto* app = parent.add_subcommand(name, help);
  app->add_option("--config", options->config_file,
                  "runner configuration (its state_dir holds the templates)");
  app->add_option("--state-dir", options->state_dir, "the state directory whose templates to use");
  return app;
}

}  // namespace

void add_template_commands(CLI::App& app, std::optional<int>& exit_code) {
  auto options = std::make_shared<TemplateOptions>();
  auto* parent = app.add_subcommand(
    "template", "build, list and remove the booted templates jobs are restored from");
  parent->require_subcommand(1);

  auto* build = add_subcommand(*parent, "build", "build the template of an image now (jobs "
                                                 "otherwise build it on first use)", options);
  build->add_option("label", options->target,
                    "image label from the configuration (default: solstice-test-guest)");
  build->add_option("--image", options->image, "a base image (qcow2 or raw) instead of a label");
  build->add_option("--vcpus", options->vcpus, "virtual CPUs (as a job's vcpus)");
  build->add_option("--memory", options->memory_mib, "memory in MiB (as a job's memory_mib)");
  build->add_option("--accel", options->accel, "accelerator: auto (KVM, else TCG), kvm or tcg")
    ->check(CLI::IsMember({"auto", "kvm", "tcg"}));
  build->callback([&exit_code, options] { exit_code = build_command(*options); });

  auto* list = add_subcommand(*parent, "list", "the templates: id, label, VM shape, state size, "
                                               "when built, build time, status", options);
  list->add_flag("--json", options->json, "one JSON object per line, each with \"v\": 1");
  list->callback([&exit_code, options] { exit_code = list_command(*options); });

  auto* rm = add_subcommand(*parent, "rm", "remove templates by id or image label", options);
  rm->add_option("target", options->target, "a template id or an image label");
  rm->add_flag("--all", options->all, "remove every template");
  rm->callback([&exit_code, options] { exit_code = rm_command(*options); });
}

}  // namespace solstice
