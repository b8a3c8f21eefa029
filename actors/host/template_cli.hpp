#pragma once
// `solstice-runner template`: the templates jobs are restored from (README "Fast
// starts"; runtime/vm/template_store.hpp).
//   template build [LABEL] [--image PATH] [--vcpus N] [--memory MIB] [--accel A]
//                              builds the template now (ahead of the first job)
//   template list [--json]     id, label, shape, state size, built at, build time, stale
//   template rm ID|LABEL|--all removes templates (running clones keep their files)
// Each takes --config / --state-dir. Exit codes: 0 done; 1 the build failed; 2
// invalid input (an unknown label or id, a bad option).
#include <optional>

namespace CLI {
class App;
}

namespace solstice {

// Adds `template` and its subcommands to `app`; the chosen one runs as `app.parse()`
// finishes and stores its exit code in `exit_code`.
void add_template_commands(CLI::App& app, std::optional<int>& exit_code);

}  // namespace solstice
