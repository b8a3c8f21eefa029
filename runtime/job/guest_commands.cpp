#include "runtime/job/guest_commands.hpp"

#include <cstdio>

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
  // `cloud-init status` is a Python start (about 5 s under TCG); the link cloud-init
  // makes in /run when its last stage of this boot ended (result.json, with its
  // errors) says "done, no errors" for free, so it is asked only otherwise.
  const std::string wait_for_cloud_init =
    "cloud_init=0; if [ -e /run/cloud-init/enabled ] && command -v cloud-init >/dev/null 2>&1; then "
    "if [ -L /run/cloud-init/result.json ] && grep -q '\"errors\": \\[\\]' /run/cloud-init/result.json; "
    "then :; else cloud-init status --wait </dev/null >/dev/null 2>&1 || cloud_init=1; fi; fi; ";
  return wait_for_cloud_init + "umask 077 && mkdir -p " + dirs + " && cat > " + env +
         " && chmod 0600 " + env + " && { [ $cloud_init = 0 ] || exit " +
         std::to_string(setup_cloud_init_failed_exit) + "; }";
}

std::string template_quiet_command() {
  return std::string{"if command -v cloud-init >/dev/null 2>&1; then "
                     "cloud-init status --wait </dev/null >/dev/null 2>&1 || echo "} +
         template_cloud_init_errors_word + "; fi; sync";
}

std::string uploads_iso_file_name(int index) { return "u" + std::to_string(index); }

std::string uploads_iso_command(const std::string& label, const std::vector<IsoUpload>& uploads) {
  const auto mount_point = shell_quote(std::string{guest_job_dir} + "/uploads-iso");
  const auto unusable = std::to_string(uploads_iso_unusable_exit);
  // Run as root: finds the drive holding the volume $1 and mounts it on $2. The
  // volume label sits at byte 40 of sector 16 (the primary volume descriptor):
  // one dd per drive reads it.
  const std::string mount_iso =
    "mount_iso() { tries=0; while :; do for d in /dev/sr*; do [ -b \"$d\" ] || continue; "
    "if [ \"$(dd if=\"$d\" bs=1 skip=32808 count=" + std::to_string(label.size()) +
    " 2>/dev/null)\" = \"$1\" ]; then "
    "mount -t iso9660 -o ro \"$d\" \"$2\" && return 0; echo \"cannot mount $d (iso9660) on $2\" >&2; return 1; fi; "
    "done; tries=$((tries + 1)); "
    "[ $tries -lt 200 ] || { echo \"no CD-ROM drive holds the volume $1\" >&2; return 1; }; "
    "sleep 0.05 2>/dev/null || sleep 1; done; }\n";
  // The copy, as the job's user, from the ISO mounted on $1.
  std::string copy =
    "mnt=$1\n"
    "put() {\n"
    "  if ! why=$(cat \"$mnt/u$1\" 2>&1 >\"$2\") || ! why=$(chmod \"$3\" \"$2\" 2>&1); then\n"
    "    echo \"upload $1: ${why:-failed}\" >&2; exit " + std::to_string(uploads_iso_failed_exit) + "\n"
    "  fi\n"
    "}\n";
  for (const auto& upload : uploads) {
    char mode[16];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(upload.mode & 07777));
    copy += "put " + std::to_string(upload.index) + " " + shell_quote(upload.destination) + " " + mode + "\n";
  }
  // Every sudo is a program start and a PAM session, up to half a second each on
  // an emulated CPU: one root shell mounts, copies as the user (setpriv, with
  // the user's groups) and unmounts. $1 label, $2 mount point, $3 uid, $4 gid, $5 copy.
  const std::string as_root =
    mount_iso + "mount_iso \"$1\" \"$2\" || exit " + unusable + "\n"
    "setpriv --reuid=\"$3\" --regid=\"$4\" --init-groups sh -c \"$5\" sh \"$2\"; status=$?\n"
    "umount \"$2\"\nexit $status\n";
  return "label=" + shell_quote(label) + "; mnt=" + mount_point + "; copy=" + shell_quote(copy) + "\n"
    "mkdir -p \"$mnt\" || exit " + unusable + "\n"
    "trap 'rmdir \"$mnt\" 2>/dev/null' EXIT\n"
    // uid and gid with built-ins (every `id` is a program start).
    "while read -r key value _; do case $key in Uid:) uid=$value ;; Gid:) gid=$value ;; esac; "
    "done </proc/self/status\n"
    "if [ \"$uid\" != 0 ] && command -v setpriv >/dev/null 2>&1; then\n"
    "  sudo -n sh -c " + shell_quote(as_root) + " sh \"$label\" \"$mnt\" \"$uid\" \"$gid\" \"$copy\"\n"
    "  status=$?\n"
    // sudo's own failures (no `sudo -n`) and setpriv's come before any copy.
    "  case $status in 0 | " + std::to_string(uploads_iso_failed_exit) + ") exit $status ;; *) exit " +
    unusable + " ;; esac\n"
    "fi\n"
    // Root, or no setpriv: a root shell mounts, this one copies, another unmounts.
    "sudo -n sh -c " + shell_quote(mount_iso + "mount_iso \"$1\" \"$2\"") + " sh \"$label\" \"$mnt\" || exit " +
    unusable + "\n"
    "trap 'sudo -n umount \"$mnt\" 2>/dev/null; rmdir \"$mnt\" 2>/dev/null' EXIT\n"
    "set -- \"$mnt\"\neval \"$copy\"\n";
}

std::string step_command_written(unsigned index) {
  return "cd \"$HOME\" 2>/dev/null || cd /; . " + shell_quote(env_file_path()) + " && exec " +
         shell_quote(step_script_path(index)) + " </dev/null";
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
