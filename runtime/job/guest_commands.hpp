#pragma once
// What the runner puts into the guest for a job: the environment file, step
// scripts and the command lines that set the guest up and run a step. Plain text
// builders. File contents (secrets above all) travel in a command's stdin, never
// in its command line, which the guest's process list shows to everyone.
#include <map>
#include <string>
#include <vector>

#include "runtime/base/shell.hpp"  // shell_quote, used with these builders

namespace solstice {

// Directory in the guest that holds the job's files.
inline constexpr const char* guest_job_dir = "/tmp/solstice";

// "export NAME='value'" lines for env and secrets (secrets last, so they win).
std::string make_env_file(const std::map<std::string, std::string>& env,
                          const std::map<std::string, std::string>& secrets);

// The script as uploaded: unchanged when it has a #! line, otherwise run by
// /bin/sh with `set -e` (a failing command fails the step, as CI users expect).
std::string make_step_script(const std::string& script);

// Guest path of step `index`'s script.
std::string step_script_path(unsigned index);
std::string env_file_path();

// The runner's set-up, one command: creates the job's directory and `directories`
// (empty names are skipped) with mode 0700, then writes its stdin (the
// make_env_file text) to env_file_path() with mode 0600.
std::string setup_command(const std::vector<std::string>& directories);

// The command that runs step `index`: writes its stdin (the make_step_script text)
// to step_script_path(index) with mode 0755, then runs that script from $HOME
// (or /) with the env file sourced and stdin from /dev/null. Its exit code and
// signal are the script's; if the script cannot be written it exits 125 and says
// why on stderr.
std::string step_command(unsigned index);

}  // namespace solstice
