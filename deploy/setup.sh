#!/usr/bin/env bash
# One step for a fresh Debian bookworm machine (as root): dependencies, build,
# test guests. Safe to run again: each part only redoes what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_INSTALL_PREFIX=/usr >/dev/null

# The test guests need nothing of the build: they are made while it compiles (their
# package downloads and image writing overlap the compiler), their output in a log.
guest_log=build/test-guests.log
(
	deploy/test-guest/build.sh build/test-guest
	deploy/test-guest/uefi/build.sh build/test-guest
	# The real cloud image (Debian, cloud-init, OpenSSH) the real-guest tests boot.
	deploy/test-guest/cloud/build.sh build/test-guest/cloud
) >"$guest_log" 2>&1 &
guests=$!

# Two cores: CAF-heavy translation units need the memory of one job each.
build_status=0
cmake --build build -j 2 || build_status=$?
guest_status=0
wait "$guests" || guest_status=$?
cat "$guest_log"
if ((guest_status != 0)); then
	echo "setup: building the test guests failed (their output above, also in $guest_log)" >&2
	exit 1
fi
if ((build_status != 0)); then
	echo "setup: the build failed (the compiler's output above the test guests' log)" >&2
	exit 1
fi
