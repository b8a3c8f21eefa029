// Loading job files: protobuf JSON of a JobSpec or a jobrequest.v1, steps named,
// relative paths resolved. Validation is in job_validation.cpp, the JSON reading
// in json_input.cpp, the jobrequest.v1 adapter in job_request.cpp.
#include "runtime/job/job_file.hpp"

#include <cstdio>
#include <ctime>
#include <random>

#include <nlohmann/json.hpp>

#include "runtime/job/job_request.hpp"

namespace solstice {
namespace {

namespace fs = std::filesystem;

fs::path resolve_against(const fs::path& base_dir, const std::string& path) {
  if (path.empty()) return {};
  fs::path candidate(path);
  if (candidate.is_absolute()) return candidate.lexically_normal();
  std::error_code ignored;
  const fs::path base = base_dir.empty() ? fs::current_path(ignored) : fs::absolute(base_dir, ignored);
  return (base / candidate).lexically_normal();
}

}  // namespace

Result<v1::JobSpec> parse_job_json(std::string_view text, const std::string& source_name,
                                   const fs::path& base_dir) {
  auto document = parse_json_text(text, source_name);
  if (!document) return fail(document.error().message);
  if (!document->is_object()) {
    return fail(source_name + ": a job file holds one JSON object, got " +
                json_input::describe(*document));
  }
  v1::JobSpec spec;
  if (is_job_request(*document)) {
    auto converted = job_from_request(*document, source_name);
    if (!converted) return converted;
    spec = std::move(*converted);
  } else if (auto parsed = json_input::convert_checked(*document, text, source_name, spec);
             !parsed) {
    return fail(parsed.error().message);
  }

  for (int i = 0; i < spec.steps_size(); ++i) {
    if (spec.steps(i).name().empty()) spec.mutable_steps(i)->set_name("step " + std::to_string(i + 1));
  }
  if (!spec.image().empty()) spec.set_image(resolve_against(base_dir, spec.image()).string());
  for (auto& upload : *spec.mutable_uploads()) {
    if (!upload.source().empty()) upload.set_source(resolve_against(base_dir, upload.source()).string());
  }
  return spec;
}

Result<v1::JobSpec> load_job_file(const fs::path& path) {
  auto text = read_small_file(path);
  if (!text) return fail(text.error().message);
  std::error_code ignored;
  return parse_job_json(*text, path.string(), fs::absolute(path, ignored).parent_path());
}

Result<void> pack_uploads(v1::JobSpec& spec) {
  using json_input::shown;
  if (!spec.image().empty())
    return fail("image " + shown(spec.image()) + ": a submitted job names its image by "
                "runs_on label only (an image path would name a file on the node)");
  uint64_t total = 0;
  for (int i = 0; i < spec.uploads_size(); ++i) {
    auto& upload = *spec.mutable_uploads(i);
    const std::string where = "uploads[" + std::to_string(i) + "].source " + shown(upload.source());
    if (upload.has_content() && upload.source().empty()) {
      total += upload.content().size();
    } else {
      if (upload.source().empty())
        return fail("uploads[" + std::to_string(i) + "].source is empty: give a file to upload");
      auto content = read_small_file(upload.source(), max_packed_upload_bytes);
      if (!content)
        return fail(where + ": " + content.error().message);
      total += content->size();
      upload.set_content(std::move(*content));
      upload.clear_source();
    }
    if (total > max_packed_upload_bytes)
      return fail(where + ": the job's uploads come to " + std::to_string(total) +
                  " bytes with this one, over the " +
                  std::to_string(max_packed_upload_bytes >> 20) +
                  " MiB a submitted job may carry");
  }
  return {};
}

Result<void> check_self_contained(const v1::JobSpec& spec) {
  using json_input::shown;
  std::string problems;
  auto add = [&](const std::string& text) { problems += (problems.empty() ? "" : "\n") + text; };
  if (!spec.image().empty())
    add("image " + shown(spec.image()) + " names a file on the node: a job from the network "
        "names its image by runs_on label only");
  for (int i = 0; i < spec.uploads_size(); ++i)
    if (!spec.uploads(i).source().empty())
      add("uploads[" + std::to_string(i) + "].source " + shown(spec.uploads(i).source()) +
          " names a file on the node: a job from the network carries its files' content "
          "(submit packs them)");
  if (problems.empty())
    return {};
  return fail(problems);
}

std::string step_display_name(const v1::JobSpec& spec, int index) {
  if (index >= 0 && index < spec.steps_size() && !spec.steps(index).name().empty()) {
    return spec.steps(index).name();
  }
  return "step " + std::to_string(index + 1);
}

std::vector<std::string> job_secret_values(const v1::JobSpec& spec) {
  std::vector<std::string> values;
  for (const auto& [name, value] : spec.secrets()) values.push_back(value);
  return values;
}

std::string make_job_id() {
  auto now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &utc);
  std::random_device random;
  char suffix[16];
  std::snprintf(suffix, sizeof suffix, "%06x", random() & 0xffffff);
  return std::string{stamp} + "-" + suffix;
}

}  // namespace solstice
