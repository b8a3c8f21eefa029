#pragma once
// `solstice-runner jobs`: the job records of a state directory, for operators.
//   jobs list                         state, name, exit code, start and duration of each
//   jobs show ID                      one job, with its summary table
//   jobs logs ID [--step N] [--raw] [--follow]   its output, replayed from events.jsonl
//   jobs cancel ID [--wait S]         cancels a job that another local process runs
// Each takes --json (one JSON object per line, each with "v": 1). Exit codes: 0
// done; 1 the job is not in a state for it (cancel of an ended job, a log whose
// runner died); 2 invalid input (an unknown id, a bad option).
#include <optional>

namespace CLI {
class App;
}

namespace solstice {

// Adds `jobs` and its subcommands to `app`; the chosen one runs as `app.parse()`
// finishes and stores its exit code in `exit_code`.
void add_jobs_commands(CLI::App& app, std::optional<int>& exit_code);

}  // namespace solstice
