#!/usr/bin/env bash
# Builds the real cloud-image test guest: Debian bookworm with systemd, cloud-init
# and OpenSSH, made by mmdebstrap from the Debian packages apt is configured with,
# booting through SeaBIOS like a distribution's cloud image. cloud-init configures
# it from the runner's NoCloud seed (user, authorized key, host key, hostname).
# No loop devices and no mounts of the image: the root file system is made with
# `mkfs.ext4 -d` from a directory, the boot partition with mtools, the partition
# table with sfdisk, all in plain files. See README.md beside this file.
#
# Usage: build.sh OUTDIR   (run as root: mmdebstrap's root mode chroots)
# Writes into OUTDIR: disk.qcow2 (compressed), guest.json, packages.txt,
# input-hash (the stamp) and cache/ (the .debs of the last build). Running it
# again with unchanged inputs (these files, the versions apt would pick for the
# packages below, the host tools' versions) does nothing.
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

suite=bookworm
user_default=runner
memory_mib=512
root_label=cloudroot
boot_mib=48    # FAT boot partition: kernel + initramfs + syslinux
disk_mib=3072  # whole disk; the root file system takes the rest
kernel_cmdline="root=LABEL=$root_label ro console=tty0 console=ttyS0,115200"
kernel_meta_package=linux-image-cloud-amd64
# Besides the essential set (mmdebstrap --variant=apt).
# e2fsprogs and cloud-guest-utils: cloud-init grows the root partition and file
# system to the disk (growpart, resize2fs) as on Debian's own cloud images.
packages=(linux-image-cloud-amd64 systemd-sysv udev dbus cloud-init openssh-server
	systemd-resolved iproute2 sudo initramfs-tools zstd e2fsprogs cloud-guest-utils)
host_tool_packages=(mmdebstrap e2fsprogs dosfstools mtools syslinux syslinux-common fdisk qemu-utils)

fail() {
	echo "test-guest-cloud: $*" >&2
	exit 1
}
log() { echo "test-guest-cloud: $*" >&2; }

for tool in mmdebstrap apt-cache dpkg-query mkfs.ext4 mkfs.vfat mcopy syslinux sfdisk qemu-img sha256sum flock; do
	command -v "$tool" >/dev/null || fail "required tool '$tool' not found (deploy/install-deps.sh installs it)"
done
[[ $(id -u) -eq 0 ]] || fail "run as root: mmdebstrap installs the packages in a chroot (its root mode)"
[[ "$(dpkg --print-architecture)" == amd64 ]] || fail "only amd64 hosts are supported"
mbr_bin=/usr/lib/syslinux/mbr/mbr.bin
[[ -s "$mbr_bin" ]] || fail "$mbr_bin is missing (package syslinux-common)"

# The sources apt is configured with (one-line or deb822 files), handed to
# mmdebstrap as they are, so the image comes from the same mirror as the host's
# packages (mmdebstrap's default would be deb.debian.org).
apt_sources=()
if [[ -f /etc/apt/sources.list ]] && grep -qE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
	apt_sources+=(/etc/apt/sources.list)
fi
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
	if [[ -s "$f" ]]; then apt_sources+=("$f"); fi
done
((${#apt_sources[@]})) || fail "apt has no sources configured (/etc/apt/sources.list, /etc/apt/sources.list.d/)"

exec 9>"$outdir/.lock"
flock -w 3600 9 || fail "timed out waiting for another build in $outdir"

# ---- 1. Inputs: these files, the versions apt picks, the host tools.
script_hash=$(cd "$here" && find . -maxdepth 1 -type f ! -name '*.md' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if show=$(apt-cache show --no-all-versions "${packages[@]}" 2>/dev/null); then
	resolved=$(awk -v meta="$kernel_meta_package" '
		/^Package: / { pkg = $2 }
		/^Version: / { if (!(pkg in seen)) { seen[pkg] = 1; print pkg "=" $2 } }
		/^Depends: / && pkg == meta {
			n = split(substr($0, 10), deps, /, */)
			for (i = 1; i <= n; i++) if (deps[i] ~ /^linux-image-[0-9]/) print "kernel " deps[i]
		}' <<<"$show" | LC_ALL=C sort)
	for p in "${packages[@]}"; do
		grep -q "^$p=" <<<"$resolved" || fail "package $p has no installable version (run apt-get update?)"
	done
	echo "$resolved" >"$cache/resolved-versions"
elif [[ -s "$cache/resolved-versions" ]]; then
	log "apt-cache cannot show the guest's packages; keeping the versions resolved before"
	resolved=$(cat "$cache/resolved-versions")
else
	fail "apt-cache cannot show the guest's packages (run apt-get update?)"
fi
host_tools=$(dpkg-query -W -f='${Package}=${Version}\n' "${host_tool_packages[@]}" 2>/dev/null || true)
input_hash=$({
	echo "script $script_hash suite $suite"
	cat "${apt_sources[@]}"
	echo "$resolved"
	echo "$host_tools"
	echo "cmdline $kernel_cmdline memory $memory_mib user $user_default disk $disk_mib boot $boot_mib"
} | sha256sum | cut -d' ' -f1)

outputs=(disk.qcow2 guest.json packages.txt)
up_to_date=1
[[ -f "$outdir/input-hash" && "$(cat "$outdir/input-hash")" == "$input_hash" ]] || up_to_date=0
for f in "${outputs[@]}"; do [[ -s "$outdir/$f" ]] || up_to_date=0; done
if ((up_to_date)); then
	log "up to date ($outdir, inputs $input_hash)"
	exit 0
fi
started=$(date +%s)

work=$(mktemp -d "$outdir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# ---- 2. The root file system. The .debs of the last build are handed in and
# the ones used taken out again, so a rebuild downloads only what changed.
# initramfs-tools is told before the kernel is installed to build a small
# initramfs with just the drivers this guest boots from.
include=$(IFS=,; echo "${packages[*]}")
# mmdebstrap mounts /proc, /sys and /dev into the chroot for the maintainer
# scripts; where mounting is not allowed (some containers) it goes without.
mount_options=()
probe=$(mktemp -d "$work/.mount-probe.XXXXXX")
if ! unshare --mount sh -c 'mount -t proc proc "$1"' sh "$probe" 2>/dev/null; then
	log "mounting is not allowed here: the chroot gets no /proc, /sys or /dev mounts (--skip=chroot/mount)"
	mount_options=(--skip=chroot/mount)
fi
rmdir "$probe"
log "mmdebstrap $suite (${packages[*]})"
mmdebstrap --variant=apt --mode=root --format=directory --include="$include" "${mount_options[@]}" \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--dpkgopt='path-exclude=/usr/share/info/*' \
	--skip=download/empty --skip=essential/unlink \
	--setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
	--setup-hook="sync-in '$cache/debs' /var/cache/apt/archives" \
	--essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" \"\$1/usr/share/initramfs-tools/modules.d\"" \
	--essential-hook="cp '$here/initramfs.conf' \"\$1/etc/initramfs-tools/conf.d/solstice-cloud-guest.conf\"" \
	--essential-hook="cp '$here/initramfs-modules' \"\$1/usr/share/initramfs-tools/modules.d/solstice-cloud-guest\"" \
	--customize-hook="$here/customize.sh" \
	--customize-hook="rm -rf '$cache/debs.new' && mkdir '$cache/debs.new'" \
	--customize-hook="sync-out /var/cache/apt/archives '$cache/debs.new'" \
	--customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
	"$suite" "$root" "${apt_sources[@]}" >"$outdir/mmdebstrap.log" 2>&1 \
	|| { tail -n 30 "$outdir/mmdebstrap.log" >&2; fail "mmdebstrap failed (log above; all of it in $outdir/mmdebstrap.log)"; }
rm -rf "$cache/debs" && mv "$cache/debs.new" "$cache/debs"
rm -f "$cache/debs/lock" && rm -rf "$cache/debs/partial"
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}=${Version}\n' | LC_ALL=C sort >"$work/packages.txt"

kernels=("$root"/boot/vmlinuz-*)
((${#kernels[@]} == 1)) && [[ -f "${kernels[0]}" ]] || fail "expected exactly one kernel in /boot, found: ${kernels[*]}"
kernel_release=${kernels[0]##*/vmlinuz-}
[[ -f "$root/boot/initrd.img-$kernel_release" ]] || fail "no initramfs for $kernel_release in /boot"

# ---- 3. Boot partition: FAT with kernel, initramfs and syslinux (its boot
# sector goes in once the partition is in the disk, at its offset).
cat >"$work/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $kernel_cmdline
EOF
export MTOOLS_SKIP_CHECK=1
boot_start=2048  # sectors: the first partition at 1 MiB
mkfs.vfat -C -n CLOUDBOOT -h "$boot_start" "$work/boot.img" $((boot_mib * 1024)) >/dev/null || fail "mkfs.vfat failed"
cp "${kernels[0]}" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kernel_release" "$work/initrd.img"
mcopy -i "$work/boot.img" "$work/vmlinuz" "$work/initrd.img" "$work/syslinux.cfg" ::/ || fail "mcopy failed"

# ---- 4. Root partition: ext4 filled from the directory (owners, modes, links kept).
root_start=$((boot_start + boot_mib * 2048))
root_sectors=$((disk_mib * 2048 - root_start))
truncate -s $((root_sectors * 512)) "$work/root.img"
mkfs.ext4 -q -F -L "$root_label" -d "$root" -E lazy_itable_init=1,lazy_journal_init=1,nodiscard \
	"$work/root.img" || fail "mkfs.ext4 -d failed"

# ---- 5. The disk: MBR (syslinux's boot code, boot partition active), both
# partitions copied in at their offsets, syslinux installed into the first.
truncate -s "${disk_mib}M" "$work/disk.raw"
sfdisk -q "$work/disk.raw" <<EOF >/dev/null || fail "sfdisk failed"
label: dos
start=$boot_start, size=$((boot_mib * 2048)), type=c, bootable
start=$root_start, size=$root_sectors, type=83
EOF
dd if="$mbr_bin" of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/boot.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$work/disk.raw" bs=1M seek=$((root_start / 2048)) conv=notrunc,sparse status=none
syslinux --install --offset $((boot_start * 512)) "$work/disk.raw" || fail "syslinux --install failed"
rm -f "$work/boot.img" "$work/root.img"

# ---- 6. Compressed qcow2 (the runner never writes it: jobs get an overlay).
compression=(-o compression_type=zstd)
qemu-img convert -c -O qcow2 "${compression[@]}" "$work/disk.raw" "$work/disk.qcow2" 2>/dev/null \
	|| qemu-img convert -c -O qcow2 "$work/disk.raw" "$work/disk.qcow2" || fail "qemu-img convert failed"
rm -f "$work/disk.raw"

# ---- 7. Manifest, then everything into place; the stamp goes last.
cat >"$work/guest.json" <<EOF
{
  "user_default": "$user_default",
  "disk": "disk.qcow2",
  "disk_format": "qcow2",
  "boot": "disk",
  "machine": "pc",
  "memory_mib": $memory_mib,
  "vcpus": 1,
  "os": "Debian $suite",
  "kernel_release": "$kernel_release",
  "cloud_init": "$(sed -n 's/^cloud-init=//p' "$work/packages.txt")"
}
EOF
rm -f "$outdir/input-hash"
for f in "${outputs[@]}"; do
	mv -f "$work/$f" "$outdir/$f"
done
echo "$input_hash" >"$outdir/input-hash"
log "built $outdir in $(($(date +%s) - started)) s: disk.qcow2 $(du -h "$outdir/disk.qcow2" | cut -f1) ($disk_mib MiB virtual), inputs $input_hash"
