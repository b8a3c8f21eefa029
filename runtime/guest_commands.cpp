#include "runtime/guest_commands.hpp"

namespace solstice {

std::string shell_quote(const std::string& value) {
  std::string out = "'";
  for (char c : value) {
    if (c == '\'')
      out += "'\\''";
    else
      out += c;
  }
  out += "'";
  return out;
}

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

std::string step_command(unsigned index) {
  return "cd \"$HOME\" 2>/dev/null || cd /; . " + env_file_path() + " && exec " +
         step_script_path(index);
}

}  // namespace solstice
