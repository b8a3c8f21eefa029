#include "runtime/job/guest_commands.hpp"

namespace solstice {

std::string make_env_file(const std::map<std::string, std::string>& env,
                          const std::map<std::string, std::string>& secrets) {
  std::string out;
  for (const auto* vars : {&env, &secrets})
    for (const auto& [name, value] : *vars)
      out += "export " + name + "=" + shell_quote(value) + "\n";
  return out;
}

std::string make_step_script(const std::string& script) {
  if (script.rfind("#!", 0) == 0)
    return script;
  auto body = script;
  if (!body.empty() && body.back() != '\n')
    body += '\n';
  return "#!/bin/sh\nset -e\n" + body;
}

std::string step_script_path(unsigned index) {
  return std::string{guest_job_dir} + "/step-" + std::to_string(index + 1);
}

std::string env_file_path() {
  return std::string{guest_job_dir} + "/env";
}

std::string setup_command(const std::vector<std::string>& directories) {
  std::string dirs = shell_quote(guest_job_dir);
  for (const auto& directory : directories)
    if (!directory.empty())
      dirs += " " + shell_quote(directory);
  const auto env = shell_quote(env_file_path());
  // cloud-init's own stdin is /dev/null: the command's stdin is the env file.
  const std::string wait_for_cloud_init =
    "cloud_init=0; if [ -e /run/cloud-init/enabled ] && command -v cloud-init >/dev/null 2>&1; then "
    "cloud-init status --wait </dev/null >/dev/null 2>&1 || cloud_init=1; fi; ";
  return wait_for_cloud_init + "umask 077 && mkdir -p " + dirs + " && cat > " + env +
         " && chmod 0600 " + env + " && { [ $cloud_init = 0 ] || exit " +
         std::to_string(setup_cloud_init_failed_exit) + "; }";
}

std::string step_command(unsigned index) {
  const auto path = step_script_path(index);
  const auto script = shell_quote(path);
  // The command's stdin is the script itself, so the step reads /dev/null instead.
  return "{ cat > " + script + " && chmod 0755 " + script + "; } || { echo " +
         shell_quote("solstice: cannot write the step script " + path + " in the guest") +
         " >&2; exit 125; }; cd \"$HOME\" 2>/dev/null || cd /; . " + shell_quote(env_file_path()) +
         " && exec " + script + " </dev/null";
}

}  // namespace solstice
