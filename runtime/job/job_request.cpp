#include "runtime/job/job_request.hpp"

#include <ctime>
#include <map>
#include <utility>

#include <nlohmann/json.hpp>

#include "runtime/base/clock.hpp"
#include "runtime/base/shell.hpp"
#include "runtime/job/job_result.hpp"
#include "runtime/job/json_input.hpp"

namespace solstice {

using json_input::describe;
using json_input::shown;
using nlohmann::json;

// solstice-ci's job request names a repository, a commit and a script inside it;
// it carries no steps. There is no checkout on the runner side, so the request
// becomes a job whose steps do it in the guest:
//  - repo_url, commit_sha (and request id, owner, name, workflow job id when set)
//    become env vars SOLSTICE_REPO_URL, SOLSTICE_COMMIT_SHA, ...;
//  - with a repo_url, a first step "checkout" clones it into $HOME/workspace and
//    checks out the commit, if git exists in the guest (without git it says so and
//    the job goes on: the image may carry the sources another way);
//  - a step "run <script_path>" runs the script from $HOME/workspace when that
//    exists (else from the login directory); a relative path is taken from there,
//    the script is executed directly when it is executable, else with sh.
// workflow_path (solstice-ci's KDL workflows) is not supported: script_path is
// required. Keys of the request this runner does not use are ignored, so newer
// requests still load.

bool is_job_request(const json& document) {
  return document.contains("request_id") || document.contains("script_path") ||
         document.contains("schema_version");
}

Result<v1::JobSpec> job_from_request(const json& document, const std::string& source) {
  static const char* const string_keys[] = {
      "schema_version", "request_id", "group_id", "source", "repo_url", "repo_owner", "repo_name",
      "commit_sha", "workflow_path", "workflow_job_id", "runs_on", "script_path", "submitted_at"};
  std::map<std::string, std::string> fields;
  for (const char* key : string_keys) {
    if (!document.contains(key) || document[key].is_null()) continue;
    if (!document[key].is_string()) {
      return fail(source + ": jobrequest.v1 field '" + key + "' must be a string, got " +
                  describe(document[key]));
    }
    fields[key] = document[key].get<std::string>();
  }
  const auto get = [&](const char* key) {
    auto found = fields.find(key);
    return found == fields.end() ? std::string() : found->second;
  };
  if (!get("schema_version").empty() && get("schema_version") != "jobrequest.v1") {
    return fail(source + ": schema_version " + shown(get("schema_version")) +
                " is not supported (expected \"jobrequest.v1\")");
  }
  if (get("script_path").empty()) {
    return fail(source + ": jobrequest.v1 field 'script_path' is missing or empty: this runner runs "
                "one script per request (workflow_path is not supported)");
  }

  v1::JobSpec spec;
  spec.set_id(get("request_id"));
  spec.set_runs_on(get("runs_on"));
  if (!get("repo_owner").empty() && !get("repo_name").empty()) {
    std::string name = get("repo_owner") + "/" + get("repo_name");
    if (!get("commit_sha").empty()) name += "@" + get("commit_sha").substr(0, 12);
    spec.set_name(name);
  } else {
    spec.set_name("jobrequest " + get("request_id"));
  }
  auto& env = *spec.mutable_env();
  const std::pair<const char*, const char*> env_of[] = {
      {"request_id", "SOLSTICE_REQUEST_ID"}, {"repo_url", "SOLSTICE_REPO_URL"},
      {"commit_sha", "SOLSTICE_COMMIT_SHA"}, {"repo_owner", "SOLSTICE_REPO_OWNER"},
      {"repo_name", "SOLSTICE_REPO_NAME"},   {"workflow_job_id", "SOLSTICE_WORKFLOW_JOB_ID"}};
  for (const auto& [key, variable] : env_of) {
    if (!get(key).empty()) env[variable] = get(key);
  }

  if (!get("repo_url").empty()) {
    auto* checkout = spec.add_steps();
    checkout->set_name("checkout");
    checkout->set_script(
        "set -eu\n"
        "if ! command -v git >/dev/null 2>&1; then\n"
        "  echo \"git is not installed in the guest: not cloning $SOLSTICE_REPO_URL\" >&2\n"
        "  exit 0\n"
        "fi\n"
        "workspace=\"$HOME/workspace\"\n"
        "rm -rf \"$workspace\"\n"
        "git clone --quiet \"$SOLSTICE_REPO_URL\" \"$workspace\"\n"
        "if [ -n \"${SOLSTICE_COMMIT_SHA:-}\" ]; then\n"
        "  git -C \"$workspace\" checkout --quiet --detach \"$SOLSTICE_COMMIT_SHA\"\n"
        "fi\n"
        "git -C \"$workspace\" log -1 --oneline\n");
  }
  auto* run = spec.add_steps();
  run->set_name("run " + get("script_path"));
  run->set_script(
      "workspace=\"$HOME/workspace\"\n"
      "if [ -d \"$workspace\" ]; then cd \"$workspace\" || exit 1; fi\n"
      "script=" + shell_quote(get("script_path")) + "\n"
      "case \"$script\" in /*) ;; *) script=\"./$script\" ;; esac\n"
      "if [ ! -f \"$script\" ]; then\n"
      "  echo \"script_path $script: no such file in $(pwd)\" >&2\n"
      "  exit 127\n"
      "fi\n"
      "if [ -x \"$script\" ]; then exec \"$script\"; else exec sh \"$script\"; fi\n");
  return spec;
}

std::string job_result_v1_json(const json& request, const v1::JobResult& result) {
  const auto text = [&](const char* key) {
    return request.contains(key) && request[key].is_string() ? request[key].get<std::string>()
                                                              : std::string();
  };
  const std::time_t ended = static_cast<std::time_t>(
    (result.ended_at_us() ? result.ended_at_us() : unix_now_us()) / 1000000);
  std::tm utc{};
  ::gmtime_r(&ended, &utc);
  char completed_at[32];
  std::strftime(completed_at, sizeof completed_at, "%Y-%m-%dT%H:%M:%SZ", &utc);
  json answer = {{"schema_version", "jobresult.v1"},
                 {"request_id", text("request_id")},
                 {"repo_url", text("repo_url")},
                 {"repo_owner", text("repo_owner")},
                 {"repo_name", text("repo_name")},
                 {"commit_sha", text("commit_sha")},
                 {"success", result.status() == v1::SUCCEEDED},
                 {"exit_code", exit_code_for(result)},
                 {"summary", result.summary()},
                 {"completed_at", completed_at}};
  return answer.dump();
}

}  // namespace solstice
