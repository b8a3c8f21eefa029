#!/usr/bin/env bash
# Builds the built-in test guest: a tiny Linux made only from Debian packages
# (apt-get download + dpkg -x; no root mounts, no loop devices) that behaves toward
# the runner like a cloud image (NoCloud seed on the IDE CD-ROM, SSH on port 22,
# ACPI power button). See README.md beside this file for what it contains and the
# commands that check a build by hand.
#
# Usage: build.sh OUTDIR
# Writes into OUTDIR: disk.raw (FAT + syslinux, boots through SeaBIOS), vmlinuz,
# initrd.img, cmdline, guest.json, input-hash (the stamp) and cache/ (downloaded
# .debs, resolved versions). Running it again with unchanged inputs (these files
# and the exact package versions apt would pick) does nothing.
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
	echo "usage: $0 OUTDIR" >&2
	exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$1"
outdir=$(cd "$1" && pwd)
cache=$outdir/cache
mkdir -p "$cache/debs"

user_default=runner
memory_mib=256
kernel_cmdline="console=ttyS0"
kernel_meta_package=linux-image-cloud-amd64
# Everything the guest is made of besides the kernel. The libraries are the ones
# the dynamic loader lists for dropbear, dropbearconvert and sftp-server; the
# build checks that list and stops if a library comes from elsewhere.
# perl-base gives the guest the RNDRESEEDCRNG ioctl (busybox has no tool for it):
# a clone restored from a template reseeds its kernel RNG with it.
packages=(busybox-static dropbear-bin openssh-sftp-server perl-base
	libc6 libcrypt1 libgmp10 libtomcrypt1 libtommath1 zlib1g)
# Kernel modules the guest needs (with their dependencies): virtio NIC and disk,
# the IDE CD-ROM of machine "pc" with ISO 9660, the ACPI power button and the
# event interface acpid reads it from, and virtio-serial (virtio_console) for the
# identity port of templates (a restored clone takes its identity there).
modules=(virtio_pci virtio_net virtio_blk ata_piix sr_mod isofs button evdev virtio_console)
# Host tools whose own files end up in the outputs (syslinux's boot loader).
host_tool_packages=(syslinux syslinux-common mtools dosfstools cpio gzip)

fail() {
	echo "test-guest: $*" >&2
	exit 1
}
log() { echo "test-guest: $*" >&2; }

for tool in apt-get apt-cache dpkg dpkg-deb dpkg-query cpio gzip mkfs.vfat mcopy syslinux sha256sum flock; do
	command -v "$tool" >/dev/null || fail "required tool '$tool' not found (deploy/install-deps.sh installs it)"
done
[[ "$(dpkg --print-architecture)" == amd64 ]] || fail "only amd64 hosts are supported (dpkg says $(dpkg --print-architecture))"

# One build at a time per OUTDIR.
exec 9>"$outdir/.lock"
flock -w 1800 9 || fail "timed out waiting for another build in $outdir"

# ---- 1. Inputs: these files, and the exact package versions apt would pick.
# apt-cache takes about half a second here (no binary cache), so the resolved
# versions are remembered together with the apt index files they came from.
script_hash=$(cd "$here" && find . -maxdepth 1 -type f ! -name '*.md' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
lists_dir=$(eval "$(apt-config shell d Dir::State::lists/d)"; echo "${d:-/var/lib/apt/lists/}")
apt_state=$({
	echo "$script_hash"
	find "$lists_dir" -maxdepth 1 -type f ! -name lock -printf '%f %s %T@\n' | sort
	find /etc/apt -maxdepth 2 \( -name 'preferences*' -o -name 'sources.list*' \) -printf '%p %s %T@\n' 2>/dev/null | sort
} | sha256sum | cut -d' ' -f1)

resolved_file=$cache/resolved-versions
resolve_versions=1
if [[ -f "$resolved_file" && "$(head -n 1 "$resolved_file")" == "$apt_state" ]]; then
	resolved=$(tail -n +2 "$resolved_file")
	resolve_versions=0
elif ! show=$(apt-cache show --no-all-versions "$kernel_meta_package" "${packages[@]}" 2>/dev/null); then
	# No usable apt index (e.g. lists removed): the versions of the last build stand.
	[[ -f "$resolved_file" ]] || fail "apt-cache cannot show the guest's packages (run apt-get update?)"
	log "apt-cache cannot show the guest's packages; keeping the versions resolved before"
	resolved=$(tail -n +2 "$resolved_file")
	resolve_versions=0
fi
if ((resolve_versions)); then
	# Package=Version per candidate; the meta package's versioned kernel dependency.
	resolved=$(awk -v meta="$kernel_meta_package" '
		/^Package: / { pkg = $2 }
		/^Version: / { if (!(pkg in seen)) { seen[pkg] = 1; if (pkg != meta) print pkg "=" $2 } }
		/^Depends: / && pkg == meta {
			n = split(substr($0, 10), deps, /, */)
			for (i = 1; i <= n; i++) if (deps[i] ~ /^linux-image-[0-9]/) { print "KERNEL " deps[i]; break }
		}' <<<"$show")
	kernel_dep=$(sed -n 's/^KERNEL //p' <<<"$resolved")
	[[ -n "$kernel_dep" ]] || fail "$kernel_meta_package has no linux-image-<version> dependency"
	kernel_package=${kernel_dep%% *}
	if [[ "$kernel_dep" =~ \(=\ *([^\)]+)\) ]]; then
		kernel_version=${BASH_REMATCH[1]}
	else
		kernel_version=$(apt-cache show --no-all-versions "$kernel_package" | sed -n 's/^Version: //p' | head -n 1)
	fi
	[[ -n "$kernel_version" ]] || fail "no version of $kernel_package is available"
	resolved=$( (grep -v '^KERNEL ' <<<"$resolved"; echo "$kernel_package=$kernel_version") | sort)
	for p in "${packages[@]}"; do
		grep -q "^$p=" <<<"$resolved" || fail "package $p has no installable version"
	done
	printf '%s\n%s\n' "$apt_state" "$resolved" >"$resolved_file.tmp"
	mv "$resolved_file.tmp" "$resolved_file"
fi

host_tools=$(dpkg-query -W -f='${Package}=${Version}\n' "${host_tool_packages[@]}" 2>/dev/null || true)
input_hash=$({
	echo "script $script_hash"
	echo "$resolved"
	echo "$host_tools"
	echo "cmdline $kernel_cmdline memory $memory_mib user $user_default"
} | sha256sum | cut -d' ' -f1)

outputs=(disk.raw vmlinuz initrd.img cmdline guest.json)
up_to_date=1
[[ -f "$outdir/input-hash" && "$(cat "$outdir/input-hash")" == "$input_hash" ]] || up_to_date=0
for f in "${outputs[@]}"; do [[ -s "$outdir/$f" ]] || up_to_date=0; done
if ((up_to_date)); then
	log "up to date ($outdir, inputs $input_hash)"
	exit 0
fi

# ---- 2. Download what the cache lacks; drop .debs no longer used.
deb_file() { # package=version -> cached .deb path (apt's naming: ':' becomes %3a)
	local pkg=${1%%=*} ver=${1#*=}
	compgen -G "$cache/debs/${pkg}_${ver//:/%3a}_*.deb" | head -n 1 || true
}
wanted=()
while read -r pv; do
	[[ -n "$pv" ]] || continue
	[[ -n "$(deb_file "$pv")" ]] || wanted+=("$pv")
done <<<"$resolved"
if ((${#wanted[@]})); then
	log "downloading ${wanted[*]}"
	# As root, apt would hand the download to its sandbox user, who may not be
	# allowed into OUTDIR; downloading as root directly is what it falls back to.
	sandbox=()
	[[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
	(cd "$cache/debs" && apt-get download -q "${sandbox[@]}" "${wanted[@]}") >&2 || fail "apt-get download failed for: ${wanted[*]}"
fi
keep=()
while read -r pv; do
	f=$(deb_file "$pv")
	[[ -n "$f" ]] || fail "download of $pv left no .deb in $cache/debs"
	keep+=("$f")
done <<<"$resolved"
for f in "$cache"/debs/*.deb; do
	[[ " ${keep[*]} " == *" $f "* ]] || rm -f "$f"
done

# ---- 3. Unpack.
work=$(mktemp -d "$outdir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
unpacked=$work/unpacked
root=$work/root
mkdir -p "$unpacked" "$root"
while read -r pv; do
	dpkg -x "$(deb_file "$pv")" "$unpacked" || fail "cannot unpack $pv"
done <<<"$resolved"

kernel_package=$(grep '^linux-image-' <<<"$resolved" | cut -d= -f1)
kernel_release=${kernel_package#linux-image-}
modules_dir=$unpacked/lib/modules/$kernel_release
[[ -f "$unpacked/boot/vmlinuz-$kernel_release" ]] || fail "$kernel_package holds no /boot/vmlinuz-$kernel_release"
busybox=$unpacked/bin/busybox
[[ -x "$busybox" ]] || fail "busybox-static holds no /bin/busybox"

# ---- 4. The root file system of the initramfs.
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/lib,lib64,lib/x86_64-linux-gnu,etc/acpi/PWRF,etc/solstice,proc,sys,dev,tmp,run,root,home,var/log,mnt}
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"
chmod 0700 "$root/root"

cp "$busybox" "$root/bin/busybox"
# Applet links everywhere busybox wants them, never over busybox itself.
while read -r applet; do
	[[ -n "$applet" && "$applet" != bin/busybox ]] || continue
	mkdir -p "$root/$(dirname "$applet")"
	ln -sf /bin/busybox "$root/$applet"
done < <("$busybox" --list-full)

install -m 0755 "$unpacked/usr/sbin/dropbear" "$root/usr/sbin/dropbear"
install -m 0755 "$unpacked/usr/bin/dropbearconvert" "$root/usr/bin/dropbearconvert"
install -m 0755 "$unpacked/usr/bin/dropbearkey" "$root/usr/bin/dropbearkey"
# dropbear runs this path for the "sftp" subsystem.
install -m 0755 "$unpacked/usr/lib/openssh/sftp-server" "$root/usr/lib/sftp-server"
# Only the interpreter: `perl -e` with built-ins needs no modules.
install -m 0755 "$unpacked/usr/bin/perl" "$root/usr/bin/perl"

# Shared libraries: whatever the unpacked loader resolves, from unpacked files only.
loader=$unpacked/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
[[ -x "$loader" ]] || fail "libc6 holds no ld-linux-x86-64.so.2"
library_path=$unpacked/lib/x86_64-linux-gnu:$unpacked/usr/lib/x86_64-linux-gnu
for binary in usr/sbin/dropbear usr/bin/dropbearconvert usr/bin/dropbearkey usr/lib/sftp-server usr/bin/perl; do
	listing=$("$loader" --library-path "$library_path" --list "$root/$binary") \
		|| fail "the dynamic loader cannot resolve the libraries of $binary"
	while read -r soname arrow path _; do
		[[ "$arrow" == "=>" ]] || continue
		[[ "$path" == "$unpacked"/* ]] \
			|| fail "$binary needs $soname, found at $path: not in the guest's packages (add its package to build.sh)"
		[[ "$soname" == */ld-linux-x86-64.so.2 ]] && continue
		cp -L "$path" "$root/lib/x86_64-linux-gnu/$soname"
	done <<<"$listing"
done
cp -L "$loader" "$root/lib64/ld-linux-x86-64.so.2"

# Kernel modules: dependency closure from modules.dep, in load order.
"$busybox" depmod -b "$unpacked" "$kernel_release" || fail "depmod failed for $kernel_release"
load_order=$(awk -v want="${modules[*]}" -v builtin_file="$modules_dir/modules.builtin" '
	function base(p) { sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); gsub(/-/, "_", p); return p }
	function visit(m,   n, d, i) {
		if (m in done) return
		done[m] = 1
		n = split(deps[m], d, " ")
		for (i = 1; i <= n; i++) visit(base(d[i]))
		print path[m]
	}
	{ m = $1; sub(/:$/, "", m); name = base(m); path[name] = m; deps[name] = ""
	  for (i = 2; i <= NF; i++) deps[name] = deps[name] " " $i }
	END {
		while ((getline line < builtin_file) > 0) builtin[base(line)] = 1
		n = split(want, w, " ")
		for (i = 1; i <= n; i++) {
			if (w[i] in path) visit(w[i])
			else if (!(w[i] in builtin)) { print "MISSING " w[i]; exit 1 }
		}
	}' "$modules_dir/modules.dep") || fail "kernel module missing from $kernel_package: $(grep MISSING <<<"$load_order" || true)"
mkdir -p "$root/lib/modules/$kernel_release"
while read -r module; do
	mkdir -p "$root/lib/modules/$kernel_release/$(dirname "$module")"
	cp "$modules_dir/$module" "$root/lib/modules/$kernel_release/$module"
done <<<"$load_order"
echo "$load_order" >"$root/lib/modules/$kernel_release/load-order"

# /init and its helpers; the default user's name goes into /init.
sed "s/@USER_DEFAULT@/$user_default/g" "$here/init" >"$root/init"
chmod 0755 "$root/init"
install -m 0755 "$here/sudo" "$root/usr/bin/sudo"
install -m 0755 "$here/power-button" "$root/etc/acpi/PWRF/00000080"
install -m 0644 "$here/user-data.awk" "$here/cloud-config.awk" "$root/etc/solstice/"
printf '/bin/sh\n/bin/ash\n' >"$root/etc/shells"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$root/etc/group"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n' >"$root/etc/profile"
cat >"$root/etc/os-release" <<EOF
NAME="Solstice test guest"
ID=solstice-test-guest
ID_LIKE=debian
PRETTY_NAME="Solstice test guest (Debian $kernel_package)"
EOF

# ---- 5. initramfs: a tiny hand-written newc archive with /dev/console (so the
# kernel has a console for /init before devtmpfs is mounted; no mknod, no root),
# followed by the staged tree; both in one gzip stream.
newc_entry() { # name mode rdevmajor rdevminor
	local name=$1 mode=$2 major=$3 minor=$4 namesize pad
	namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
		0 "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0 "$name"
	pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}
{
	newc_entry dev $((0040755)) 0 0
	newc_entry dev/console $((0020600)) 5 1
	newc_entry TRAILER!!! 0 0 0
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible)
} | gzip -9 -n >"$work/initrd.img"

cp "$unpacked/boot/vmlinuz-$kernel_release" "$work/vmlinuz"
echo "$kernel_cmdline" >"$work/cmdline"

# ---- 6. disk.raw: FAT file system in a plain file, syslinux boot sector, no
# partition table (SeaBIOS boots the FAT boot sector directly).
payload_kib=$((($(stat -c %s "$work/vmlinuz") + $(stat -c %s "$work/initrd.img")) / 1024))
disk_kib=$(((payload_kib + 4096 + 1023) / 1024 * 1024))
cat >"$work/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $kernel_cmdline
EOF
export MTOOLS_SKIP_CHECK=1
mkfs.vfat -C -n SOLSTICE -i 50150001 "$work/disk.raw" "$disk_kib" >/dev/null || fail "mkfs.vfat failed"
mcopy -i "$work/disk.raw" "$work/vmlinuz" "$work/initrd.img" "$work/syslinux.cfg" ::/ || fail "mcopy failed"
syslinux --install "$work/disk.raw" || fail "syslinux --install failed"

# ---- 7. Manifest, then move everything into place; the stamp goes last.
cat >"$work/guest.json" <<EOF
{
  "user_default": "$user_default",
  "disk": "disk.raw",
  "disk_format": "raw",
  "kernel": "vmlinuz",
  "initrd": "initrd.img",
  "cmdline": "$kernel_cmdline",
  "machine": "pc",
  "memory_mib": $memory_mib,
  "markers": {
    "init_started": "SOLSTICE-GUEST: init started",
    "seed_found": "SOLSTICE-GUEST: seed found",
    "network_up": "SOLSTICE-GUEST: network up",
    "sshd_started": "SOLSTICE-GUEST: sshd started",
    "powering_off": "SOLSTICE-GUEST: powering off",
    "error_prefix": "SOLSTICE-GUEST: error:"
  }
}
EOF
rm -f "$outdir/input-hash"
for f in "${outputs[@]}"; do
	mv -f "$work/$f" "$outdir/$f"
done
echo "$input_hash" >"$outdir/input-hash"
log "built $outdir ($(du -h "$outdir/disk.raw" | cut -f1) disk, inputs $input_hash)"
