#!/usr/bin/env bash
# Builds the UEFI-only twin of the test guest: the same kernel and initramfs on a
# GPT disk whose one partition is an EFI system partition (FAT) holding systemd-boot
# (Debian's systemd-boot-efi, apt-get download + dpkg -x) as \EFI\BOOT\BOOTX64.EFI
# and one loader entry. No root, no mounts: sfdisk and mtools work on plain files.
# OVMF boots it; SeaBIOS does not (the GPT's protective MBR holds no boot code).
#
# Usage: build.sh GUESTDIR   (GUESTDIR: a test guest built by ../build.sh)
# Writes GUESTDIR/uefi/: disk.raw, guest.json, input-hash (the stamp) and cache/.
# Running it again with unchanged inputs does nothing.
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
	echo "usage: $0 GUESTDIR" >&2
	exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest=$(cd "$1" && pwd)
outdir=$guest/uefi
cache=$outdir/cache

fail() {
	echo "test-guest-uefi: $*" >&2
	exit 1
}
log() { echo "test-guest-uefi: $*" >&2; }

for tool in apt-get apt-cache dpkg dpkg-query sfdisk mkfs.vfat mmd mcopy sha256sum flock; do
	command -v "$tool" >/dev/null || fail "required tool '$tool' not found (deploy/install-deps.sh installs it)"
done
for f in vmlinuz initrd.img cmdline input-hash guest.json; do
	[[ -s "$guest/$f" ]] || fail "$guest/$f is missing: build the test guest first (deploy/test-guest/build.sh $guest)"
done
mkdir -p "$cache"
exec 9>"$outdir/.lock"
flock -w 1800 9 || fail "timed out waiting for another build in $outdir"

# ---- 1. Inputs: this script, the guest it copies, systemd-boot's version, the tools.
boot_package=systemd-boot-efi
if version=$(apt-cache show --no-all-versions "$boot_package" 2>/dev/null | sed -n 's/^Version: //p' | head -n 1) && [[ -n "$version" ]]; then
	echo "$version" >"$cache/version"
elif [[ -s "$cache/version" ]]; then
	version=$(cat "$cache/version")
	log "apt-cache cannot show $boot_package; keeping version $version"
else
	fail "apt-cache cannot show $boot_package (run apt-get update?)"
fi
input_hash=$({
	sha256sum "$here/build.sh" | cut -d' ' -f1
	cat "$guest/input-hash"
	echo "$boot_package=$version"
	dpkg-query -W -f='${Package}=${Version}\n' mtools dosfstools fdisk 2>/dev/null || true
} | sha256sum | cut -d' ' -f1)
if [[ -f "$outdir/input-hash" && "$(cat "$outdir/input-hash")" == "$input_hash" && -s "$outdir/disk.raw" && -s "$outdir/guest.json" ]]; then
	log "up to date ($outdir, inputs $input_hash)"
	exit 0
fi

# ---- 2. systemd-boot, from its Debian package.
deb=$(compgen -G "$cache/${boot_package}_${version//:/%3a}_*.deb" | head -n 1 || true)
if [[ -z "$deb" ]]; then
	log "downloading $boot_package=$version"
	sandbox=()
	[[ $(id -u) -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)
	(cd "$cache" && rm -f ./*.deb && apt-get download -q "${sandbox[@]}" "$boot_package=$version") >&2 \
		|| fail "apt-get download failed for $boot_package=$version"
	deb=$(compgen -G "$cache/${boot_package}_${version//:/%3a}_*.deb" | head -n 1 || true)
	[[ -n "$deb" ]] || fail "download of $boot_package left no .deb in $cache"
fi
work=$(mktemp -d "$outdir/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg -x "$deb" "$work/unpacked" || fail "cannot unpack $deb"
loader=$work/unpacked/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[[ -s "$loader" ]] || fail "$boot_package holds no systemd-bootx64.efi"

# ---- 3. The EFI system partition: a FAT file system in a plain file.
cmdline=$(cat "$guest/cmdline")
printf 'default guest.conf\ntimeout 0\n' >"$work/loader.conf"
printf 'title Solstice test guest (UEFI)\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' "$cmdline" >"$work/guest.conf"
payload_kib=$((($(stat -c %s "$guest/vmlinuz") + $(stat -c %s "$guest/initrd.img") + $(stat -c %s "$loader")) / 1024))
esp_mib=$(((payload_kib + 4096 + 1023) / 1024))
export MTOOLS_SKIP_CHECK=1
mkfs.vfat -C -n SOLSTICEESP -i 50150002 "$work/esp.img" $((esp_mib * 1024)) >/dev/null || fail "mkfs.vfat failed"
mmd -i "$work/esp.img" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries || fail "mmd failed"
mcopy -i "$work/esp.img" "$loader" ::/EFI/BOOT/BOOTX64.EFI || fail "mcopy failed"
mcopy -i "$work/esp.img" "$guest/vmlinuz" "$guest/initrd.img" ::/ || fail "mcopy failed"
mcopy -i "$work/esp.img" "$work/loader.conf" ::/loader/loader.conf || fail "mcopy failed"
mcopy -i "$work/esp.img" "$work/guest.conf" ::/loader/entries/guest.conf || fail "mcopy failed"

# ---- 4. disk.raw: GPT, the ESP at 1 MiB, room for the backup GPT at the end.
truncate -s $(((esp_mib + 2) * 1024 * 1024)) "$work/disk.raw"
printf 'label: gpt\nstart=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP"\n' $((esp_mib * 2048)) \
	| sfdisk --quiet "$work/disk.raw" >/dev/null || fail "sfdisk failed"
dd if="$work/esp.img" of="$work/disk.raw" bs=1M seek=1 conv=notrunc status=none || fail "dd failed"

# The test guest's manifest, pointing at this disk, with the firmware it needs.
sed -e 's/"disk": "disk.raw"/"disk": "disk.raw",\n  "firmware": "uefi"/' \
	-e 's/"kernel": "vmlinuz"/"kernel": "..\/vmlinuz"/' -e 's/"initrd": "initrd.img"/"initrd": "..\/initrd.img"/' \
	"$guest/guest.json" >"$work/guest.json"

rm -f "$outdir/input-hash"
mv -f "$work/disk.raw" "$work/guest.json" "$outdir/"
echo "$input_hash" >"$outdir/input-hash"
log "built $outdir ($(du -h "$outdir/disk.raw" | cut -f1) disk, inputs $input_hash)"
