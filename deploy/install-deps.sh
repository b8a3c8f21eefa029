#!/usr/bin/env bash
# Installs every build, test and run-time dependency from Debian bookworm packages.
# Idempotent: packages already present are left alone.
set -euo pipefail

packages=(
  # build
  cmake ninja-build g++ pkg-config
  libcaf-dev libssh2-1-dev libprotobuf-dev protobuf-compiler libspdlog-dev
  nlohmann-json3-dev libcli11-dev libssl-dev libexpected-dev doctest-dev librabbitmq-dev
  # the guest walled off from the host (runtime/vm/guest_firewall.hpp); nft to inspect it
  libnftables-dev nftables
  libcurl4-openssl-dev
  # run time
  qemu-system-x86 qemu-utils
  ovmf
  # test guest builder (deploy/test-guest/build.sh)
  cpio gzip dosfstools mtools syslinux syslinux-common dropbear-bin busybox-static
  # its UEFI twin (deploy/test-guest/uefi/build.sh: GPT via sfdisk; systemd-boot is apt-get download'ed)
  fdisk
  # the cloud-image test guest (deploy/test-guest/cloud/build.sh: mmdebstrap, mkfs.ext4 -d)
  mmdebstrap e2fsprogs
  # tests: ISO inspection, cloud-config schema check, OpenSSH as a reference client
  xorriso genisoimage cloud-init openssh-client
  # metrics endpoint (HTTP server library)
  libcpp-httplib-dev
  # package test (tests/package): .deb dependencies, man page, completion
  dpkg-dev man-db bash-completion
  # runner nodes on RabbitMQ: the tests start their own brokers
  rabbitmq-server
  # certificates the TLS tests make (make-cluster-certs.sh, the amqps:// test)
  openssl
  # benchmarks (bench/run.sh); stand-in QEMUs of the reliability tests (QMP clients)
  python3
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The rabbitmq-server package starts a system broker as it is installed; the
  # tests start brokers of their own, so a freshly installed one is stopped and
  # disabled (an operator's existing broker is left alone).
  if [[ " ${missing[*]} " == *" rabbitmq-server "* ]]; then
    if [[ -d /run/systemd/system ]]; then
      systemctl disable --now rabbitmq-server.service >/dev/null 2>&1 || true
    else
      service rabbitmq-server stop >/dev/null 2>&1 || true
      update-rc.d rabbitmq-server disable >/dev/null 2>&1 || true
    fi
  fi
fi

# The unprivileged user QEMU runs as when the runner is root (config key qemu_user,
# README "QEMU's user"); in group kvm, where there is one, for /dev/kvm.
qemu_user=solstice-qemu
if ! getent passwd "$qemu_user" >/dev/null; then
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "Solstice Runner QEMU" "$qemu_user"
fi
if getent group kvm >/dev/null && ! id -nG "$qemu_user" | grep -qw kvm; then
  usermod --append --groups kvm "$qemu_user"
fi
