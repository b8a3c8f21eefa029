#pragma once
// What the runner puts into the guest for a job: the environment file, step
// scripts and the command lines that set the guest up and run a step. Plain text
// builders. File contents (secrets above all) travel in a command's stdin, never
// in its command line, which the guest's process list shows to everyone.
#include <cstdint>
#include <map>
#include <optional>
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

// The runner's set-up, one command: first, in a guest whose cloud-init runs this
// boot (its generator made /run/cloud-init/enabled), waits for cloud-init to
// finish (`cloud-init status --wait`), so no step starts while cloud-init still
// creates users, writes files or restarts sshd; guests without cloud-init, or
// with cloud-init disabled, do not wait. Then creates the job's directory and
// `directories` (empty names are skipped) with mode 0700, and writes its stdin
// (the make_env_file text) to env_file_path() with mode 0600. Exits 0, or
// setup_cloud_init_failed_exit when all that was done but cloud-init ended with
// errors, or the failing command's code.
std::string setup_command(const std::vector<std::string>& directories);

// setup_command's exit code when its work is done and cloud-init ended with
// errors (`cloud-init status` says which): the job goes on, with a notice.
inline constexpr int setup_cloud_init_failed_exit = 97;

// What a template's guest runs before it is frozen: waits for cloud-init to finish
// (where there is one) and writes everything to disk. It prints
// template_cloud_init_errors_word when cloud-init ended with errors, a state every
// clone inherits (the template records it; each job gets the notice).
std::string template_quiet_command();
inline constexpr const char* template_cloud_init_errors_word = "solstice-cloud-init-errors";

// Uploads that travel on a read-only ISO (README "Uploads"): upload `index` is the
// ISO's file uploads_iso_file_name(index).
std::string uploads_iso_file_name(int index);

struct IsoUpload {
  int index = 0;             // the job's upload index (its file on the ISO)
  std::string destination;   // absolute guest path
  uint32_t mode = 0644;
};

// Run as the job's user after the set-up: finds the CD-ROM drive holding the volume
// `label` (waiting up to 10 s for a medium just inserted), mounts it read-only
// under the job's directory (`sudo -n mount`), writes each file to its destination
// as the user with `cat >` (so owner, group and the treatment of an existing file
// are what an SFTP upload gives), chmods it to its mode, and unmounts. Exits 0;
// uploads_iso_unusable_exit when the ISO cannot be reached (no `sudo -n`, no drive
// holding it, no iso9660 mount): nothing was written, and stderr says why;
// uploads_iso_failed_exit when an upload failed: stderr's last line is
// "upload INDEX: why" (the shell's or chmod's own message).
std::string uploads_iso_command(const std::string& label, const std::vector<IsoUpload>& uploads);
inline constexpr int uploads_iso_unusable_exit = 96;
inline constexpr int uploads_iso_failed_exit = 95;

// The command that runs step `index`: writes its stdin (the make_step_script text)
// to step_script_path(index) with mode 0755, then runs that script from $HOME
// (or /) with the env file sourced and stdin from /dev/null. Its exit code and
// signal are the script's; if the script cannot be written it exits 125 and says
// why on stderr.
std::string step_command(unsigned index);
// The command that runs step `index` whose script is in place already (the
// identity agent wrote it: GuestJobFiles::step_scripts): as step_command, without
// writing it (no stdin; two program starts fewer).
std::string step_command_written(unsigned index);

}  // namespace solstice

namespace solstice {

// What the set-up makes in the guest for a job (setup_command): its directories
// and its env file (make_env_file's text, secrets included).
struct GuestJobFiles {
  std::vector<std::string> directories;  // besides guest_job_dir; empty names skipped
  std::string env_file;
  // The steps' make_step_script texts, in order, written (mode 0755) where
  // step_command would write them; none when they are together over
  // step_scripts_max_bytes (the guest's shell reads the identity byte by byte).
  std::vector<std::string> step_scripts;
};
inline constexpr size_t step_scripts_max_bytes = 64 * 1024;

// A restored clone's fresh identity, given before any step (README "Fast starts").
struct GuestIdentity {
  std::string authorized_key;    // the job's own public key line: the only one accepted
  std::string host_key_private;  // the job's host key (OpenSSH private key)
  std::string host_key_public;   // and its public line (written as sshd's .pub)
  std::string hostname;
  std::string instance_id;
  int64_t unix_now_us = 0;       // the host's wall clock when the command is sent
  std::string random_bytes;      // host randomness mixed into the guest's kernel RNG
  // Given over the identity port only: the identity agent also makes the job's
  // files, as the set-up would (which then does not run).
  std::optional<GuestJobFiles> job_files;
};

// The command that gives a clone `identity` (its stdin: make_identity_input): the
// job's key replaces every authorized key (the template's stops working at once),
// the clock is set, the kernel RNG gets the random bytes and is reseeded (by the
// kernel's vmgenid driver where it is bound, else RNDRESEEDCRNG through perl where
// there is one), hostname and instance id change, and the SSH server is restarted
// with the new host key (dropbear or OpenSSH). The running session stays up; new
// connections meet the new host key. Runs as root (through sudo -n for another
// user). Over SSH the identity carries no job files (the set-up makes them).
std::string identity_command();
std::string make_identity_input(const GuestIdentity& identity);

// make_identity_input's text as the one line the identity agent reads from its
// port: printf's escapes (octal for newlines and all but plain characters), which
// the shell agent decodes with its printf built-in (no program start), the perl
// agent with a substitution.
std::string identity_line(const std::string& identity_input);

// Run over SSH in a template's guest (as its user; sudo -n for root) before it is
// saved: finds the virtio-serial port named `port_name` (loading virtio_console
// where it is a module) and starts the identity agent there, as root and detached
// (runtime/vm/identity_channel.hpp has its protocol). The agent writes its ready
// line, then blocks reading one line: a clone's identity, which it gives the guest
// as identity_command's script does (the user's authorized_keys path and uid:gid
// are fixed now), makes the identity's job files (owned by that user, modes as
// the set-up makes them), writes its status line and exits: identity_ok_line, or
// identity_ok_without_files_prefix and why when only the job files failed (the
// set-up then makes them), or identity_failed_prefix and why. Exits 0 when the
// agent was started, or identity_agent_no_port_exit when the guest has no such
// port (no driver).
std::string identity_agent_command(const std::string& port_name);
// identity_agent_command's stdin: the agent as a perl program, started instead of
// the shell's where the guest has perl and OpenSSH (no program start in a clone).
std::string identity_agent_input();
inline constexpr int identity_agent_no_port_exit = 3;

// The agent's status lines (one per clone); runtime/vm/identity_channel.hpp reads them.
inline constexpr const char* identity_ok_line = "solstice-identity ok";
inline constexpr const char* identity_ok_without_files_prefix = "solstice-identity ok without job files: ";
inline constexpr const char* identity_failed_prefix = "solstice-identity failed: ";

}  // namespace solstice
