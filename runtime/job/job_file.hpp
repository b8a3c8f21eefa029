#pragma once
// Job files: the protobuf JSON mapping of v1::JobSpec (field names in lowerCamel or
// snake_case), or solstice-ci's `jobrequest.v1` JSON. Loading turns a file into a
// JobSpec with every relative path resolved; validation checks it against the
// runner's configuration before any VM starts.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/base/error.hpp"
#include "runtime/job/json_input.hpp"  // parse_proto_json, parse_json_text, read_small_file
#include "solstice.pb.h"

namespace solstice {

// Reads and parses `path`; relative upload sources and a relative image path are
// resolved against the file's directory.
Result<v1::JobSpec> load_job_file(const std::filesystem::path& path);

// Parses job JSON. `source_name` prefixes every error ("job.json:3:7: ...");
// relative paths are resolved against `base_dir` (the current directory if empty).
// Steps without a name are named "step N" (N counted from 1).
Result<v1::JobSpec> parse_job_json(std::string_view text, const std::string& source_name,
                                   const std::filesystem::path& base_dir);

// Every check that can be made before a VM starts. All problems are reported at
// once, one per line, each naming its field and value. The job's disk image (its
// own `image`, or the disk of its runs_on image) must be a file QEMU can open as
// the format it will be given: `qemu-img info` is asked (see check_disk_image), so
// a corrupt qcow2 is refused here, not when its VM is prepared.
Result<void> validate_job(const v1::JobSpec& spec, const v1::RunnerConfig& config);

// Upper bounds validate_job enforces (README, "Job files"): far beyond any real
// job, low enough that no timer overflows and a typo is caught.
inline constexpr uint32_t max_timeout_seconds = 7 * 24 * 3600;  // job and step timeouts
inline constexpr uint32_t max_keep_seconds = 24 * 3600;         // debug_on_failure.keep_seconds
inline constexpr uint32_t max_retries = 10;                     // retries

// What a job sent to a cluster may carry in its uploads' bytes, all together
// (README, "Cluster"): submit packs the files into the job, as one message.
inline constexpr uint64_t max_packed_upload_bytes = 16u << 20;

// For `submit`: reads each upload's source file into its `content` and clears
// the source, so the job names no file of the submitter's host or of a node.
// Refuses an `image` path (a submitted job names its image by runs_on label)
// and uploads over max_packed_upload_bytes in all, naming the file.
Result<void> pack_uploads(v1::JobSpec& spec);

// What a node checks in every job that reached it over the network: it names
// no path on the node (no `image`, no upload `source`), so a submitter cannot
// choose a node's file (its TLS key, say) to upload into its guest.
Result<void> check_self_contained(const v1::JobSpec& spec);

// A new job id: UTC time plus random hex, e.g. 20261127-211503-9f3a1c.
std::string make_job_id();

// The name a step is shown under: its own, or "step N" (N = index + 1).
std::string step_display_name(const v1::JobSpec& spec, int index);

// The values of the job's secrets (for a Redactor).
std::vector<std::string> job_secret_values(const v1::JobSpec& spec);

}  // namespace solstice
