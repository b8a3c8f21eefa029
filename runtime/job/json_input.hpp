#pragma once
// JSON input with positions: small files read safely, JSON parsed with
// "SOURCE:LINE:COLUMN: what" errors and duplicate keys refused, and protobuf JSON
// whose wrong fields are named by their path before protobuf's own parser runs.
// Shared by job files, config files and manifests.
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

#include <google/protobuf/message.h>
#include <nlohmann/json_fwd.hpp>

#include "runtime/base/error.hpp"

namespace solstice {

// Protobuf JSON into `message`, with errors that a person can act on: syntax errors
// as "SOURCE:LINE:COLUMN: what", unknown fields and wrong types named by their path
// ("SOURCE: unknown field 'steps[0].scrpt'"). Shared by job and config files.
Result<void> parse_proto_json(std::string_view text, const std::string& source_name,
                              google::protobuf::Message& message);

// Plain JSON with the same "SOURCE:LINE:COLUMN: what" syntax errors.
Result<nlohmann::json> parse_json_text(std::string_view text, const std::string& source_name);

// Reads a whole small file (job, config, manifest); refuses non-regular files and
// files larger than `max_bytes`. Errors name the path.
Result<std::string> read_small_file(const std::filesystem::path& path,
                                    std::size_t max_bytes = 16u << 20);

// Pieces the job file readers share.
namespace json_input {

// A value as it appears in messages: JSON-quoted (invalid UTF-8 replaced), shortened.
std::string shown(std::string_view value);

// "string \"x\"", "number 3", "an array", ...: what a JSON value is, for messages.
std::string describe(const nlohmann::json& value);

// `document` (parsed from `text`) into `message`: the shape checks of
// parse_proto_json, then protobuf's parser.
Result<void> convert_checked(const nlohmann::json& document, std::string_view text,
                             const std::string& source, google::protobuf::Message& message);

}  // namespace json_input
}  // namespace solstice
