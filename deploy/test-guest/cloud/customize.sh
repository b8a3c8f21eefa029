#!/bin/sh
# mmdebstrap customize hook of build.sh: $1 is the finished root file system.
# Only what a cloud image ships with goes here; the user, its key, the host key
# and the hostname come from the NoCloud seed through cloud-init at boot.
set -eu
root=$1

# No host keys in the image: every clone would share them. cloud-init writes
# the seed's key (or generates keys) before sshd first starts.
rm -f "$root"/etc/ssh/ssh_host_*

# The root file system by label; nothing else is mounted.
printf 'LABEL=cloudroot / ext4 rw,discard,errors=remount-ro 0 1\n' >"$root/etc/fstab"
echo debian >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
: >"$root/etc/machine-id"

# cloud-init: look only for the NoCloud seed (no probing of cloud metadata
# services over the network, which costs tens of seconds when there is none).
cat >"$root/etc/cloud/cloud.cfg.d/90-solstice-datasource.cfg" <<'EOF'
# Set by deploy/test-guest/cloud/build.sh: the seed is a NoCloud ISO (label cidata).
datasource_list: [ NoCloud, None ]
EOF

# The locale the image has (cloud-init would otherwise generate en_US.UTF-8,
# which needs the locale sources).
echo 'LANG=C.UTF-8' >"$root/etc/default/locale"
cat >"$root/etc/cloud/cloud.cfg.d/90-solstice-locale.cfg" <<'EOF'
# Set by deploy/test-guest/cloud/build.sh: the image's own locale, nothing to generate.
locale: C.UTF-8
EOF

# Networking by systemd-networkd (cloud-init renders its configuration there),
# names by systemd-resolved.
chroot "$root" systemctl enable systemd-networkd.service systemd-resolved.service >/dev/null 2>&1
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Timers that would only compete with jobs for the emulated CPU.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
	chroot "$root" systemctl disable "$unit" >/dev/null 2>&1 || true
done

