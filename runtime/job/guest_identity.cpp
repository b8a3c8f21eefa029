// The identity a restored clone takes (README "Fast starts"): the scripts that give
// it in the guest — over SSH (identity_command), or by the identity agent the
// template's guest runs on its virtio-serial port — and the input they read.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstring>

#include "runtime/job/guest_commands.hpp"

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
IFS= read -r job_scripts
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
# The steps' scripts: $job_scripts is path|text|path|text... (the runner's paths,
# plain words; the texts as printf formats), each written 0755 as step_command would.
write_scripts() {
	default_ifs=$IFS
	set -f; IFS='|'; set -- $job_scripts; IFS=$default_ifs; set +f
	while [ $# -ge 2 ]; do
		printf "$2" >"$1" || return 1
		scripts="$scripts $1"
		shift 2
	done
	[ -z "$scripts" ] || chmod 0755 $scripts
}
# The job's files, as the set-up makes them as the user: $job_dirs lists every
# component of every directory, parents first (shell words made by the runner);
# the ones made here, the env file (0600) and the scripts get the user's uid:gid.
make_job_files() {
	eval "set -- $job_dirs"
	new= i=0
	for dir; do
		i=$((i + 1))
		[ -e "$dir" ] || new="$new \"\${$i}\""
	done
	mkdir -p -- "$@" || return 1
	printf "$job_env" >"$job_env_path" || return 1
	scripts=
	write_scripts || return 1
	[ "$owner" = 0:0 ] || eval "chown -h -- \"\$owner\" $new \"\$job_env_path\" $scripts" || return 1
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

// The agent as a perl program, where the guest has perl and OpenSSH: the same
// work as agent_script + identity_script, with no program started at all (the
// shell's date, perl, mkdir and chown are most of a clone's identity time on TCG;
// perl was started, with its modules, when the template was built). Arguments as
// the shell agent's: authorized_keys, the port's device, the user's uid:gid.
constexpr const char* perl_agent = R"PL(use strict;
use Config;
$0 = 'solstice-identity-agent';
my ($keys, $port_path, $owner) = @ARGV;
# Looked up now: %Config's other keys load a file, a clone should not.
my ($arch) = $Config{archname} =~ /^([^-]+)/;
my $clock_settime = { x86_64 => 227, aarch64 => 112 }->{$arch // ''};
open(my $port, '+<', $port_path) or exit 1;
binmode $port;
syswrite($port, "solstice-identity ready\n");
sub unescape { my $s = shift; $s =~ s/\\([0-7]{1,3})/chr(oct($1))/ge; return $s; }
sub put {
	my ($path, $text) = @_;
	open(my $f, '>', $path) or die "cannot write $path: $!\n";
	print $f $text or die "cannot write $path: $!\n";
	close($f) or die "cannot write $path: $!\n";
}
# The words of shell_quote'd arguments, as the shell's eval "set -- $words" makes them.
sub words {
	my @out;
	for my $word ($_[0] =~ /((?:'[^']*'|\\.|[^\s'\\])+)/g) {
		$word =~ s/'([^']*)'|\\(.)|([^'\\])/defined $1 ? $1 : defined $2 ? $2 : $3/ge;
		push @out, $word;
	}
	return @out;
}
sub listening {
	for my $table ('/proc/net/tcp', '/proc/net/tcp6') {
		open(my $f, '<', $table) or next;
		while (<$f>) { my @field = split; return 1 if ($field[1] // '') =~ /:0016$/ && ($field[3] // '') eq '0A'; }
	}
	return 0;
}
sub set_clock {
	my $now = shift;
	return if defined $clock_settime && syscall($clock_settime, 0, pack('q q', $now, 0)) == 0;
	system('date', '-u', '-s', "\@$now") == 0 or die "cannot set the clock to $now\n";
}
sub give_host_key {
	my ($private, $public) = @_;
	if (opendir(my $dir, '/etc/ssh')) {
		for (readdir($dir)) {
			unlink("/etc/ssh/$_") if /^ssh_host_.*_key(\.pub)?$/ && !/^ssh_host_ed25519_key(\.pub)?$/;
		}
	}
	umask(077);
	put('/etc/ssh/ssh_host_ed25519_key', $private);
	umask(022);
	put('/etc/ssh/ssh_host_ed25519_key.pub', "$public\n");
	# From OpenSSH 9.8 on sshd-session gets the host keys from the listener: it re-reads them.
	# Before, nothing restarts: the listener never stops (returns whether it may have).
	my @session = grep { -e } qw(/usr/lib/openssh/sshd-session /usr/libexec/openssh/sshd-session
		/usr/libexec/sshd-session /usr/lib/ssh/sshd-session);
	return 0 unless @session;
	if (-s '/run/sshd.pid' && open(my $f, '<', '/run/sshd.pid')) { my $pid = <$f>; kill('HUP', int($pid)); }
	else { system('systemctl reload ssh sshd 2>/dev/null'); }
	return 1;
}
# The job's directories (every component, parents first) and its env file, owned by the user.
sub make_job_files {
	my ($dirs, $env_path, $env, $scripts) = @_;
	my @dirs = words($dirs);
	my @new = grep { !-e } @dirs;
	for my $dir (@dirs) {
		next if mkdir($dir);
		my $why = $!;
		return "cannot make the directory $dir: $why" unless -d $dir;
	}
	eval { put($env_path, $env); 1 } or return $@;
	# The steps' scripts: path|text|path|text... (texts as printf formats), 0755.
	my @scripts = split(/\|/, $scripts);
	my @written;
	while (@scripts >= 2) {
		my ($path, $text) = splice(@scripts, 0, 2);
		eval { put($path, unescape($text)); 1 } or return $@;
		chmod(0755, $path) or return "chmod $path: $!";
		push @written, $path;
	}
	return '' if $owner eq '0:0';
	my ($uid, $gid) = split(/:/, $owner);
	for my $path (@new, $env_path, @written) { chown($uid, $gid, $path) or return "chown $path: $!"; }
	return '';
}
sub give_identity {
	my @part = split(/\n/, shift, 11);
	my ($authorized_key, $hostname, $instance_id, $now, $random, $host_key_public, $dirs, $env_path, $env,
		$scripts) = @part;
	my $host_key = $part[10] // '';
	$host_key .= "\n" if $host_key ne '' && $host_key !~ /\n\z/;
	umask(077);
	my $new_keys = !-e $keys;
	put($keys, "$authorized_key\n");
	if ($new_keys) { my @dir = stat($keys =~ s{/[^/]*$}{}r); chown($dir[4], $dir[5], $keys); }
	umask(022);
	set_clock($now);
	# The runner's random bytes mixed in, then the kernel's RNG reseeded (RNDRESEEDCRNG).
	if (open(my $f, '>', '/dev/urandom')) {
		syswrite($f, unescape($random));
		ioctl($f, 0x5207, 0);
		close($f);
	}
	eval { put('/proc/sys/kernel/hostname', $hostname); 1 }
		or system('hostname', $hostname) == 0 or die "cannot set the hostname\n";
	put('/etc/hostname', "$hostname\n");
	if (-w '/etc/hosts' && open(my $f, '<', '/etc/hosts')) {
		my @lines = <$f>;
		my $changed = 0;
		for (@lines) { $changed = 1 if s/^127\.0\.1\.1[ \t].*/127.0.1.1\t$hostname/; }
		put('/etc/hosts', join('', map { /\n\z/ ? $_ : "$_\n" } @lines)) if $changed;
	}
	put('/run/instance-id', "$instance_id\n");
	put('/var/lib/cloud/data/instance-id', "$instance_id\n") if -d '/var/lib/cloud/data';
	umask(077);
	my $files = $dirs ne '' ? make_job_files($dirs, $env_path, unescape($env), $scripts // '') : '';
	give_host_key($host_key, $host_key_public) or return $files;
	for (1 .. 250) { return $files if listening(); select(undef, undef, undef, 0.02); }
	die "the SSH server did not listen again\n";
}
# The host side may not be connected yet (a read then ends at once): try again.
my ($buffer, $line) = ('', '');
while ($line eq '') {
	my $got = sysread($port, $buffer, 65536, length($buffer));
	if (!$got) { select(undef, undef, undef, 0.2); next; }
	while ($line eq '' && (my $end = index($buffer, "\n")) >= 0) { $line = substr($buffer, 0, $end); substr($buffer, 0, $end + 1) = ''; }
}
my $files = eval { give_identity(unescape($line)) };
my $why = substr(($@ || $files // '') =~ s/\s+/ /gr =~ s/ $//r, 0, 300);
my $answer = $@ ? "solstice-identity failed: $why" : $files ne '' ? "solstice-identity ok without job files: $why" : 'solstice-identity ok';
syswrite($port, "$answer\n");
)PL";

// Run as root: $1 authorized_keys, $2 the port's name, $3 the agent, $4 the
// identity script, $5 the user's uid:gid. /sys names each virtio-serial port;
// devtmpfs has its node. OpenSSH's host keys of other types than the clones'
// go now (with or without the port), so that no clone has to start `rm` for them.
// Its stdin is the perl agent (identity_agent_input), which it starts instead of
// the shell's where the guest allows.
constexpr const char* agent_installer = R"SH(perl_agent=$(cat)
find_port() {
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
# The perl agent where it can do all the work (perl, and OpenSSH rather than dropbear).
if [ -n "$perl_agent" ] && command -v perl >/dev/null 2>&1 && [ -d /etc/ssh ] &&
	! { [ -d /etc/dropbear ] && command -v dropbear >/dev/null 2>&1; }; then
	setsid perl -e "$perl_agent" "$1" "$port" "$5" </dev/null >/dev/null 2>&1 &
else
	setsid /bin/sh -c "$3" solstice-identity-agent "$1" "$port" "$4" "$5" </dev/null >/dev/null 2>&1 &
fi
)SH";

// The script as sent: without its comment lines (a command line is bounded, e.g.
// dropbear takes at most 9000 bytes).
std::string without_comments(const char* script) {
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
  return out;
}

std::string quoted_script(const char* script) { return shell_quote(without_comments(script)); }

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

std::string identity_agent_input() { return without_comments(perl_agent); }

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
// shell words; the env file's path; its text as a printf format; the scripts as
// path|text|... (step_script_path's names are plain words; printf_format escapes '|').
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
  std::string scripts;
  for (size_t index = 0; index < files.step_scripts.size(); ++index)
    scripts += (index ? "|" : "") + step_script_path(static_cast<unsigned>(index)) + "|" +
               printf_format(files.step_scripts[index]);
  return words + "\n" + env_file_path() + "\n" + printf_format(files.env_file) + "\n" + scripts + "\n";
}

}  // namespace

std::string make_identity_input(const GuestIdentity& identity) {
  const int64_t seconds = (identity.unix_now_us + 500000) / 1000000;
  return identity.authorized_key + "\n" + identity.hostname + "\n" + identity.instance_id + "\n" +
         std::to_string(seconds) + "\n" + printf_format(identity.random_bytes, true) + "\n" +
         identity.host_key_public + "\n" +
         (identity.job_files ? job_files_lines(*identity.job_files) : "\n\n\n\n") +
         identity.host_key_private;
}

std::string identity_line(const std::string& identity_input) {
  return printf_format(identity_input);
}

}  // namespace solstice
