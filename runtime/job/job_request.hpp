#pragma once
// solstice-ci's `jobrequest.v1` JSON as a job: a repository, a commit and a script
// in it become env vars, a checkout step and a step that runs the script.
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "runtime/base/error.hpp"
#include "solstice.pb.h"

namespace solstice {

// Whether a parsed job file is a jobrequest.v1 rather than a JobSpec.
bool is_job_request(const nlohmann::json& document);

// The job a jobrequest.v1 asks for; `source` prefixes every error.
Result<v1::JobSpec> job_from_request(const nlohmann::json& document, const std::string& source);

// solstice-ci's `jobresult.v1` answer to `request` (a jobrequest.v1) for `result`:
// schema_version, request_id, repo_url/owner/name, commit_sha, success,
// exit_code, summary, completed_at (RFC 3339, UTC).
std::string job_result_v1_json(const nlohmann::json& request, const v1::JobResult& result);

}  // namespace solstice
