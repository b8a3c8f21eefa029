#!/usr/bin/env bash
# One step for a fresh Debian bookworm machine (as root): dependencies, build,
# test guests. Safe to run again: each part only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr >/dev/null
# Two cores: CAF-heavy translation units need the memory of one job each.
cmake --build build -j 2
deploy/test-guest/build.sh build/test-guest
deploy/test-guest/uefi/build.sh build/test-guest
# The real cloud image (Debian, cloud-init, OpenSSH) the real-guest tests boot.
deploy/test-guest/cloud/build.sh build/test-guest/cloud
