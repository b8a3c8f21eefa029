#include "runtime/job/guest_commands.hpp"

#include <cstdio>

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

// Reads the input's lines, then the host key (the rest). Each part says what
// failed; the RNG reseed is best effort (a guest without perl still gets the
// bytes mixed in, and a kernel with the vmgenid driver reseeds by itself).
// Shell built-ins wherever they do the work: every program started costs a clone
// on TCG 50-150 ms (its code translated anew), and the clone waits for this.
constexpr const char* identity_script = R"SH(set -e
keys=$1
read -r authorized_key
read -r new_hostname
read -r instance_id
read -r now
read -r random
read -r host_key_public
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
if command -v perl >/dev/null 2>&1; then
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
umask 077
listening() { grep -q '^ *[0-9]*: [0-9A-F]*:0016 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
if [ -d /etc/dropbear ] && command -v dropbear >/dev/null 2>&1; then
	printf '%s' "$host_key" >/run/solstice-host-key
	dropbearconvert openssh dropbear /run/solstice-host-key /etc/dropbear/dropbear_ed25519_host_key.new >/dev/null 2>&1
	rm -f /run/solstice-host-key
	mv -f /etc/dropbear/dropbear_ed25519_host_key.new /etc/dropbear/dropbear_ed25519_host_key
	# The listener is the dropbear whose parent is init; this session's own stays.
	for pid in $(pidof dropbear); do
		if [ "$(cut -d' ' -f4 /proc/$pid/stat)" = 1 ]; then kill "$pid"; fi
	done
	for _ in $(seq 100); do listening || break; sleep 0.02; done
	setsid dropbear -F -E -s -p 22 -W 2097152 -r /etc/dropbear/dropbear_ed25519_host_key \
		</dev/null >>/var/log/dropbear.log 2>&1 &
elif [ -d /etc/ssh ]; then
	rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
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
for _ in $(seq 250); do listening && exit 0; sleep 0.02; done
echo "solstice: the SSH server did not listen again" >&2
exit 1
)SH";

// Run as root: $1 the user's authorized_keys, $2 the port's device, $3 the
// identity script. Nothing but the one line is read from the port; the answer is
// one line too (the failing command's stderr, on one line).
constexpr const char* agent_script = R"SH(keys=$1
port=$2
identity=$3
exec 3<>"$port" || exit 1
printf '%s\n' 'solstice-identity ready' >&3
line=
# The host side may not be connected yet (a read then ends at once): try again.
until IFS= read -r line <&3 && [ -n "$line" ]; do
	sleep 0.2 2>/dev/null || sleep 1
done
if out=$(printf '%s\n' "$line" | base64 -d | /bin/sh -c "$identity" identity "$keys" 2>&1 >/dev/null); then
	printf '%s\n' 'solstice-identity ok' >&3
else
	printf 'solstice-identity failed: %s\n' "$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)" >&3
fi
exec 3>&-
)SH";

// Run as root: $1 authorized_keys, $2 the port's name, $3 the agent, $4 the
// identity script. /sys names each virtio-serial port; devtmpfs has its node.
constexpr const char* agent_installer = R"SH(find_port() {
	for name in /sys/class/virtio-ports/*/name; do
		[ -r "$name" ] && [ "$(cat "$name")" = "$2" ] || continue
		dir=${name%/name}
		port=/dev/${dir##*/}
		[ -c "$port" ] && return 0
	done
	return 1
}
port=
if ! find_port "$@" && modprobe virtio_console >/dev/null 2>&1; then
	for _ in $(seq 50); do find_port "$@" && break; sleep 0.1; done
fi
if [ -z "$port" ] || [ ! -c "$port" ]; then
	echo "solstice: no virtio-serial port named $2 in this guest" >&2
	exit 3
fi
setsid /bin/sh -c "$3" solstice-identity-agent "$1" "$port" "$4" </dev/null >/dev/null 2>&1 &
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

// Runs as root: itself for root, through sudo -n for another user.
constexpr const char* as_root_prefix =
  "keys=\"$HOME/.ssh/authorized_keys\"; as_root=; [ \"$(id -u)\" = 0 ] || as_root=\"sudo -n\"; ";

}  // namespace

std::string identity_agent_command(const std::string& port_name) {
  return std::string{as_root_prefix} + "$as_root /bin/sh -c " + quoted_script(agent_installer) +
         " install \"$keys\" " + shell_quote(port_name) + " " + quoted_script(agent_script) + " " +
         quoted_script(identity_script);
}

std::string identity_command() {
  return std::string{as_root_prefix} + "$as_root /bin/sh -c " + quoted_script(identity_script) +
         " identity \"$keys\"";
}

std::string make_identity_input(const GuestIdentity& identity) {
  const int64_t seconds = (identity.unix_now_us + 500000) / 1000000;
  // The random bytes as printf's octal escapes: written by a shell built-in.
  std::string octal;
  for (unsigned char c : identity.random_bytes) {
    char escape[5];
    std::snprintf(escape, sizeof escape, "\\%03o", c);
    octal += escape;
  }
  return identity.authorized_key + "\n" + identity.hostname + "\n" + identity.instance_id + "\n" +
         std::to_string(seconds) + "\n" + octal + "\n" + identity.host_key_public + "\n" +
         identity.host_key_private;
}

}  // namespace solstice
