#pragma once
// What the runner puts into the guest for a job: the environment file, step
// scripts and the command line that runs a step. Plain text builders.
#include <map>
#include <string>

namespace solstice {

// Directory in the guest that holds the job's files.
inline constexpr const char* guest_job_dir = "/tmp/solstice";

// 'it'\''s' — safe for any bytes in a POSIX shell.
std::string shell_quote(const std::string& value);

// "export NAME='value'" lines for env and secrets (secrets last, so they win).
std::string make_env_file(const std::map<std::string, std::string>& env,
                          const std::map<std::string, std::string>& secrets);

// The script as uploaded: unchanged when it has a #! line, otherwise run by
// /bin/sh with `set -e` (a failing command fails the step, as CI users expect).
std::string make_step_script(const std::string& script);

// Guest path of step `index`'s script.
std::string step_script_path(unsigned index);
std::string env_file_path();

// The command that runs step `index`: sources the env file, starts in $HOME.
std::string step_command(unsigned index);

}  // namespace solstice
