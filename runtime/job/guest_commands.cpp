#include "runtime/job/guest_commands.hpp"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>

#include "runtime/ssh/ssh_keys.hpp"

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
  // One root shell finds the drive and mounts it: every sudo is a program start
  // and a PAM session, up to a second each on an emulated CPU. The volume label
  // sits at byte 40 of sector 16 (the primary volume descriptor).
  const std::string find_and_mount =
    "tries=0; while :; do for d in /dev/sr*; do [ -b \"$d\" ] || continue; "
    "if [ \"$(dd if=\"$d\" bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=" +
    std::to_string(label.size()) + " 2>/dev/null)\" = \"$1\" ]; then "
    "mount -t iso9660 -o ro \"$d\" \"$2\" && exit 0; echo \"cannot mount $d (iso9660) on $2\" >&2; exit 1; fi; "
    "done; tries=$((tries + 1)); "
    "[ $tries -lt 200 ] || { echo \"no CD-ROM drive holds the volume $1\" >&2; exit 1; }; "
    "sleep 0.05 2>/dev/null || sleep 1; done";
  std::string script =
    "label=" + shell_quote(label) + "; mnt=" + mount_point + "\n"
    "mkdir -p \"$mnt\" || exit " + unusable + "\n"
    "sudo -n sh -c " + shell_quote(find_and_mount) + " sh \"$label\" \"$mnt\" || exit " + unusable + "\n"
    "trap 'sudo -n umount \"$mnt\" 2>/dev/null; rmdir \"$mnt\" 2>/dev/null' EXIT\n"
    "put() {\n"
    "  if ! why=$(cat \"$mnt/u$1\" 2>&1 >\"$2\") || ! why=$(chmod \"$3\" \"$2\" 2>&1); then\n"
    "    echo \"upload $1: ${why:-failed}\" >&2; exit " + std::to_string(uploads_iso_failed_exit) + "\n"
    "  fi\n"
    "}\n";
  for (const auto& upload : uploads) {
    char mode[16];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(upload.mode & 07777));
    script += "put " + std::to_string(upload.index) + " " + shell_quote(upload.destination) + " " + mode + "\n";
  }
  return script;
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

namespace solstice {

namespace {

// $1 the user's authorized_keys, $2 the user's uid:gid (for the job files). Reads
// the input's lines, then the host key (the rest). Each part says what failed;
// the RNG reseed is best effort (a guest without perl still gets the bytes mixed
// in). Exits 0, or 4 when all but the job files was done (make_job_files says
// why on stderr). Shell built-ins wherever they do the work: every program
// started costs a clone on TCG 50-150 ms (its code translated anew), and the
// clone waits for this.
constexpr const char* identity_script = R"SH(set -e
keys=$1
owner=$2
read -r authorized_key
read -r new_hostname
read -r instance_id
read -r now
read -r random
read -r host_key_public
IFS= read -r job_dirs
IFS= read -r job_env_path
IFS= read -r job_env
host_key=
while IFS= read -r line; do host_key="$host_key$line
"; done
[ -z "$line" ] || host_key="$host_key$line
"
umask 077
# Rewritten in place, it keeps its owner and mode; a new one gets the directory's owner.
new_keys=1
[ -e "$keys" ] && new_keys=0
printf '%s\n' "$authorized_key" >"$keys"
[ "$new_keys" = 0 ] || chown "$(stat -c %u:%g "${keys%/*}")" "$keys"
umask 022  # hostname and instance id are for everyone to read
date -u -s "@$now" >/dev/null
printf "$random" >/dev/urandom  # octal escapes, made by the runner
# A bound vmgenid driver reseeded the kernel's RNG on QEMU's new GUID for this clone.
vmgenid=
for d in /sys/bus/acpi/drivers/vmgenid/*:*; do [ ! -e "$d" ] || vmgenid=1; done
if [ -z "$vmgenid" ] && command -v perl >/dev/null 2>&1; then
	perl -e 'open(my $f, ">", "/dev/urandom") or exit 1; ioctl($f, 0x5207, 0) or exit 1' \
		|| echo "solstice: the kernel RNG was not reseeded (RNDRESEEDCRNG failed)" >&2
fi
{ echo "$new_hostname" >/proc/sys/kernel/hostname; } 2>/dev/null || hostname "$new_hostname"
echo "$new_hostname" >/etc/hostname
if [ -w /etc/hosts ]; then
	hosts= changed=0
	while IFS= read -r entry || [ -n "$entry" ]; do
		case $entry in 127.0.1.1" "* | 127.0.1.1"	"*) entry="127.0.1.1	$new_hostname"; changed=1 ;; esac
		hosts="$hosts$entry
"
	done </etc/hosts
	[ "$changed" = 0 ] || printf '%s' "$hosts" >/etc/hosts
fi
echo "$instance_id" >/run/instance-id
if [ -d /var/lib/cloud/data ]; then echo "$instance_id" >/var/lib/cloud/data/instance-id; fi
# The job's files, as the set-up makes them as the user: $job_dirs lists every
# component of every directory, parents first (shell words made by the runner);
# the ones made here and the env file (0600) get the user's uid:gid.
make_job_files() {
	eval "set -- $job_dirs"
	new= i=0
	for dir; do
		i=$((i + 1))
		[ -e "$dir" ] || new="$new \"\${$i}\""
	done
	mkdir -p -- "$@" || return 1
	printf "$job_env" >"$job_env_path" || return 1
	[ "$owner" = 0:0 ] || eval "chown -h -- \"\$owner\" $new \"\$job_env_path\"" || return 1
}
umask 077
job_files=0
[ -z "$job_dirs" ] || make_job_files || job_files=4
# Something listens on port 22 (state 0A), read with built-ins.
listening() {
	for table in /proc/net/tcp /proc/net/tcp6; do
		[ -r "$table" ] || continue
		while read -r _ local _ state _; do
			case "$local $state" in *:0016" "0A) return 0 ;; esac
		done <"$table"
	done
	return 1
}
if [ -d /etc/dropbear ] && command -v dropbear >/dev/null 2>&1; then
	printf '%s' "$host_key" >/run/solstice-host-key
	dropbearconvert openssh dropbear /run/solstice-host-key /etc/dropbear/dropbear_ed25519_host_key.new >/dev/null 2>&1
	rm -f /run/solstice-host-key
	mv -f /etc/dropbear/dropbear_ed25519_host_key.new /etc/dropbear/dropbear_ed25519_host_key
	# The listener is the dropbear whose parent is init; this session's own stays
	# (found first, killed after: once the listener is gone, init adopts the session's).
	listeners=
	for stat in /proc/[0-9]*/stat; do
		read -r pid comm _ ppid _ <"$stat" 2>/dev/null || continue
		if [ "$comm" = "(dropbear)" ] && [ "$ppid" = 1 ]; then listeners="$listeners $pid"; fi
	done
	[ -z "$listeners" ] || kill $listeners
	n=0
	while [ $n -lt 100 ] && listening; do sleep 0.02; n=$((n + 1)); done
	setsid dropbear -F -E -s -p 22 -W 2097152 -r /etc/dropbear/dropbear_ed25519_host_key \
		</dev/null >>/var/log/dropbear.log 2>&1 3>&- &
elif [ -d /etc/ssh ]; then
	# Its only host key is the new one (the template's build removed the others
	# where it could: one program start less here).
	others=
	for f in /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub; do
		case $f in */ssh_host_ed25519_key | */ssh_host_ed25519_key.pub) ;; *) [ ! -e "$f" ] || others=1 ;; esac
	done
	[ -z "$others" ] || rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
	printf '%s' "$host_key" >/etc/ssh/ssh_host_ed25519_key
	umask 022  # the public key is public, as sshd's own are
	printf '%s\n' "$host_key_public" >/etc/ssh/ssh_host_ed25519_key.pub
	# Up to OpenSSH 9.7 every connection re-executes sshd, which loads the host keys
	# anew: nothing to restart (a restart costs a clone on TCG most of a second).
	# From 9.8 on, sshd-session gets them from the listener: that one must re-read.
	session=
	for f in /usr/lib/openssh/sshd-session /usr/libexec/openssh/sshd-session /usr/libexec/sshd-session /usr/lib/ssh/sshd-session; do
		[ -e "$f" ] && session=$f
	done
	if [ -n "$session" ]; then
		if [ -s /run/sshd.pid ]; then read -r sshd_pid </run/sshd.pid; kill -HUP "$sshd_pid"; else systemctl reload ssh sshd 2>/dev/null; fi
	fi
else
	echo "solstice: no dropbear or OpenSSH server to give the new host key" >&2
	exit 1
fi
n=0
while [ $n -lt 250 ]; do listening && exit $job_files; sleep 0.02; n=$((n + 1)); done
echo "solstice: the SSH server did not listen again" >&2
exit 1
)SH";

// Run as root: $1 the user's authorized_keys, $2 the port's device, $3 the
// identity script, $4 the user's uid:gid. Nothing but the one line is read from
// the port; the answer is one line too (the failing command's stderr, on one line).
constexpr const char* agent_script = R"SH(keys=$1
port=$2
identity=$3
owner=$4
exec 3<>"$port" || exit 1
printf '%s\n' 'solstice-identity ready' >&3
line=
# The host side may not be connected yet (a read then ends at once): try again.
until IFS= read -r line <&3 && [ -n "$line" ]; do
	sleep 0.2 2>/dev/null || sleep 1
done
# printf decodes the line (identity_line); the script runs in a subshell of this
# shell: no program start for either.
out=$(printf "$line" | { set -- "$keys" "$owner"; eval "$identity"; } 2>&1 >/dev/null)
status=$?
if [ "$status" = 0 ]; then
	printf '%s\n' 'solstice-identity ok' >&3
elif [ "$status" = 4 ]; then
	printf 'solstice-identity ok without job files: %s\n' "$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)" >&3
else
	printf 'solstice-identity failed: %s\n' "$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)" >&3
fi
exec 3>&-
)SH";

// Run as root: $1 authorized_keys, $2 the port's name, $3 the agent, $4 the
// identity script, $5 the user's uid:gid. /sys names each virtio-serial port;
// devtmpfs has its node. OpenSSH's host keys of other types than the clones'
// go now (with or without the port), so that no clone has to start `rm` for them.
constexpr const char* agent_installer = R"SH(find_port() {
	for name in /sys/class/virtio-ports/*/name; do
		[ -r "$name" ] && [ "$(cat "$name")" = "$2" ] || continue
		dir=${name%/name}
		port=/dev/${dir##*/}
		[ -c "$port" ] && return 0
	done
	return 1
}
for key in /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub; do
	[ -e "$key" ] || continue
	case $key in */ssh_host_ed25519_key | */ssh_host_ed25519_key.pub) ;; *) rm -f "$key" ;; esac
done
# A clone rewrites these in place (they keep their modes): private and public.
[ ! -e /etc/ssh/ssh_host_ed25519_key ] || chmod 0600 /etc/ssh/ssh_host_ed25519_key
[ ! -e /etc/ssh/ssh_host_ed25519_key.pub ] || chmod 0644 /etc/ssh/ssh_host_ed25519_key.pub
port=
if ! find_port "$@" && modprobe virtio_console >/dev/null 2>&1; then
	for _ in $(seq 50); do find_port "$@" && break; sleep 0.1; done
fi
if [ -z "$port" ] || [ ! -c "$port" ]; then
	echo "solstice: no virtio-serial port named $2 in this guest" >&2
	exit 3
fi
setsid /bin/sh -c "$3" solstice-identity-agent "$1" "$port" "$4" "$5" </dev/null >/dev/null 2>&1 &
)SH";

// The script as sent: without its comment lines (a command line is bounded, e.g.
// dropbear takes at most 9000 bytes), quoted for the shell.
std::string quoted_script(const char* script) {
  std::string out, line;
  for (const char* p = script; *p; ++p) {
    line += *p;
    if (*p != '\n' && p[1] != '\0')
      continue;
    auto first = line.find_first_not_of(" \t");
    if (first == std::string::npos || line[first] != '#')
      out += line;
    line.clear();
  }
  return shell_quote(out);
}

// Runs as root: itself for root, through sudo -n for another user (whose
// uid:gid $owner keeps).
constexpr const char* as_root_prefix =
  "keys=\"$HOME/.ssh/authorized_keys\"; owner=\"$(id -u):$(id -g)\"; as_root=; "
  "[ \"${owner%%:*}\" = 0 ] || as_root=\"sudo -n\"; ";

}  // namespace

std::string identity_agent_command(const std::string& port_name) {
  return std::string{as_root_prefix} + "$as_root /bin/sh -c " + quoted_script(agent_installer) +
         " install \"$keys\" " + shell_quote(port_name) + " " + quoted_script(agent_script) + " " +
         quoted_script(identity_script) + " \"$owner\"";
}

std::string identity_command() {
  return std::string{as_root_prefix} + "$as_root /bin/sh -c " + quoted_script(identity_script) +
         " identity \"$keys\" \"$owner\"";
}

namespace {

// `bytes` as a printf format that prints them (one line, written by a shell
// built-in): octal escapes for all but plain characters (`all`: for every byte;
// never a leading `-`, which printf would take for an option).
std::string printf_format(const std::string& bytes, bool all = false) {
  std::string out;
  for (unsigned char c : bytes) {
    if (!all && c != '\0' && (std::isalnum(c) || std::strchr(" ,./:=@_+'", c) != nullptr)) {
      out += static_cast<char>(c);
      continue;
    }
    char escape[5];
    std::snprintf(escape, sizeof escape, "\\%03o", c);
    out += escape;
  }
  return out;
}

// The job files' lines: every component of every directory, parents first, as
// shell words; the env file's path; its text as a printf format.
std::string job_files_lines(const GuestJobFiles& files) {
  std::vector<std::string> all{guest_job_dir};
  all.insert(all.end(), files.directories.begin(), files.directories.end());
  std::vector<std::string> components;
  for (const auto& directory : all) {
    if (directory.empty())
      continue;
    // "/a/b/c": "/a", "/a/b", "/a/b/c"
    for (auto end = directory.find('/', 1);; end = directory.find('/', end + 1)) {
      auto component = directory.substr(0, end);
      if (component != "/" && std::find(components.begin(), components.end(), component) == components.end())
        components.push_back(component);
      if (end == std::string::npos)
        break;
    }
  }
  std::string words;
  for (const auto& component : components)
    words += (words.empty() ? "" : " ") + shell_quote(component);
  return words + "\n" + env_file_path() + "\n" + printf_format(files.env_file) + "\n";
}

}  // namespace

std::string make_identity_input(const GuestIdentity& identity) {
  const int64_t seconds = (identity.unix_now_us + 500000) / 1000000;
  return identity.authorized_key + "\n" + identity.hostname + "\n" + identity.instance_id + "\n" +
         std::to_string(seconds) + "\n" + printf_format(identity.random_bytes, true) + "\n" +
         identity.host_key_public + "\n" +
         (identity.job_files ? job_files_lines(*identity.job_files) : "\n\n\n") +
         identity.host_key_private;
}

std::string identity_line(const std::string& identity_input) {
  return printf_format(identity_input);
}

}  // namespace solstice
