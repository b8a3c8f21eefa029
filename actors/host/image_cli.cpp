#include "actors/host/image_cli.hpp"

#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <memory>
#include <string>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "actors/host/runner_host.hpp"
#include "runtime/job/job_result.hpp"
#include "runtime/vm/image_cache.hpp"

namespace solstice {

namespace {

constexpr int exit_check_failed = 1;

struct ImageOptions {
  std::string config_file;
  std::string state_dir;
  bool json = false;
  std::string url;
  std::string sha256;
  std::string label;
  std::string firmware;
};

int report_error(const std::string& message, int code) {
  std::fprintf(stderr, "solstice-runner: %s\n", message.c_str());
  return code;
}

// "2025-01-31 12:00" in local time, "never" for 0.
std::string time_text(int64_t unix_us) {
  if (unix_us <= 0)
    return "never";
  std::time_t seconds = static_cast<std::time_t>(unix_us / 1000000);
  std::tm local{};
  localtime_r(&seconds, &local);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M", &local);
  return buf;
}

std::string size_text(uint64_t bytes) {
  char buf[32];
  if (bytes >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.1f GiB", static_cast<double>(bytes) / (1ull << 30));
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", static_cast<double>(bytes) / (1ull << 20));
  return buf;
}

int pull_command(const ImageOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  PullRequest request;
  request.url = options.url;
  request.sha256 = options.sha256;
  request.label = options.label.empty() ? default_label_for_url(options.url) : options.label;
  request.firmware = options.firmware;
  request.progress = ::isatty(STDERR_FILENO) != 0;
  if (auto ok = normalize_sha256(request.sha256, "--sha256"); !ok)
    return report_error(ok.error().message, exit_invalid_input);
  if (auto ok = check_image_label(request.label, options.label.empty() ? "the label made from the URL" : "--label");
      !ok)
    return report_error(ok.error().message + (options.label.empty() ? " (give one with --label)" : ""),
                        exit_invalid_input);
  auto pulled = pull_image(*config, request);
  if (!pulled)
    return report_error(pulled.error().message, exit_check_failed);
  std::printf("pulled %s: %s, %s, sha256 %s\n", pulled->label.c_str(), pulled->format.c_str(),
              size_text(pulled->size).c_str(), pulled->sha256.c_str());
  return 0;
}

int list_command(const ImageOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  auto images = list_cached_images(*config);
  if (!images)
    return report_error(images.error().message, exit_invalid_input);
  if (options.json) {
    for (const auto& image : *images)
      std::printf("%s\n", nlohmann::ordered_json{{"v", 1},
                                                 {"label", image.label},
                                                 {"size", image.size},
                                                 {"sha256", image.sha256},
                                                 {"format", image.format},
                                                 {"firmware", image.firmware.empty() ? "bios" : image.firmware},
                                                 {"url", image.url},
                                                 {"pulled_at_us", image.pulled_at_us},
                                                 {"last_used_us", image.last_used_us},
                                                 {"path", image.blob.string()}}
                            .dump()
                            .c_str());
    return 0;
  }
  if (images->empty()) {
    std::printf("no images in %s (solstice-runner image pull URL --sha256 HEX adds one)\n",
                image_cache_dir(*config).c_str());
    return 0;
  }
  std::printf("%-28s %-6s %10s  %-16s %-8s %s\n", "LABEL", "FORMAT", "SIZE", "LAST USED", "FIRMWARE", "SHA256");
  for (const auto& image : *images)
    std::printf("%-28s %-6s %10s  %-16s %-8s %s\n", image.label.c_str(), image.format.c_str(),
                size_text(image.size).c_str(), time_text(image.last_used_us).c_str(),
                image.firmware.empty() ? "bios" : image.firmware.c_str(), image.sha256.c_str());
  return 0;
}

int rm_command(const ImageOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  if (auto removed = remove_cached_image(*config, options.label); !removed)
    return report_error(removed.error().message, exit_invalid_input);
  std::printf("removed %s\n", options.label.c_str());
  return 0;
}

int verify_command(const ImageOptions& options) {
  auto config = load_effective_config(options.config_file, options.state_dir, "");
  if (!config)
    return report_error(config.error().message, exit_invalid_input);
  std::vector<CachedImage> images;
  if (!options.label.empty()) {
    auto image = find_cached_image(*config, options.label);
    if (!image)
      return report_error(image.error().message, exit_invalid_input);
    images.push_back(*image);
  } else {
    auto all = list_cached_images(*config);
    if (!all)
      return report_error(all.error().message, exit_invalid_input);
    images = *all;
  }
  int bad = 0;
  for (const auto& image : images) {
    const std::string problem = verify_cached_image(image);
    if (problem.empty()) {
      std::printf("%s: ok (sha256 %s)\n", image.label.c_str(), image.sha256.c_str());
    } else {
      std::printf("%s: FAILED: %s\n", image.label.c_str(), problem.c_str());
      ++bad;
    }
  }
  std::fflush(stdout);
  if (bad)
    return report_error(std::to_string(bad) + " of " + std::to_string(images.size()) +
                          " images failed the check (solstice-runner image pull fetches one again)",
                        exit_check_failed);
  return 0;
}

CLI::App* add_image_subcommand(CLI::App& image, const std::string& name, const std::string& help,
                               const std::shared_ptr<ImageOptions>& options) {
  auto* app = image.add_subcommand(name, help);
  app->add_option("--config", options->config_file,
                  "runner configuration (its state_dir holds the image cache)");
  app->add_option("--state-dir", options->state_dir, "the state directory whose cache to use");
  return app;
}

}  // namespace

void add_image_commands(CLI::App& app, std::optional<int>& exit_code) {
  auto options = std::make_shared<ImageOptions>();
  auto* image = app.add_subcommand("image", "download, list, check and remove the base images jobs "
                                            "run on (the state directory's image cache)");
  image->require_subcommand(1);

  auto* pull = add_image_subcommand(*image, "pull", "download an image, check its sha256, cache it "
                                                    "under a label", options);
  pull->add_option("url", options->url, "http(s) URL of a qcow2 or raw disk image")->required();
  pull->add_option("--sha256", options->sha256, "the image's sha256 (64 hex digits)")->required();
  pull->add_option("--label", options->label,
                   "the runs_on label jobs use (default: the URL's file name without extensions)");
  pull->add_option("--firmware", options->firmware, "how the image boots: bios (default) or uefi")
    ->check(CLI::IsMember({"bios", "uefi"}));
  pull->callback([&exit_code, options] { exit_code = pull_command(*options); });

  auto* list = add_image_subcommand(*image, "list", "the cached images: label, format, size, last use, "
                                                    "firmware, sha256", options);
  list->add_flag("--json", options->json, "one JSON object per line, each with \"v\": 1");
  list->callback([&exit_code, options] { exit_code = list_command(*options); });

  auto* rm = add_image_subcommand(*image, "rm", "remove a label (and its image when no other label "
                                                "uses it)", options);
  rm->add_option("label", options->label, "the label to remove")->required();
  rm->callback([&exit_code, options] { exit_code = rm_command(*options); });

  auto* verify = add_image_subcommand(*image, "verify", "hash cached images again and check QEMU "
                                                        "can read them", options);
  verify->add_option("label", options->label, "one label (default: every one)");
  verify->callback([&exit_code, options] { exit_code = verify_command(*options); });
}

}  // namespace solstice
