#pragma once
// `solstice-runner prune --older-than AGE | --keep N [--dry-run]`: removes finished
// job records of a state directory (runtime/job/job_prune.hpp), printing each one it
// removes (with --dry-run: would remove). Exit codes: 0 done; 2 invalid input;
// 125 a record could not be removed.
#include <optional>

namespace CLI {
class App;
}

namespace solstice {

void add_prune_command(CLI::App& app, std::optional<int>& exit_code);

}  // namespace solstice
