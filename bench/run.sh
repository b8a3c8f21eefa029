#!/usr/bin/env bash
# Runs every benchmark: Solstice Runner against QEMU + OpenSSH by hand, side by side.
#
#   bench/run.sh [--size tiny|full] [--pairs N] [--scale-pairs N] [--json OUT]
#                [--build-dir DIR] [--runner PATH] [--guest-dir DIR] [--keep]
#
# Defaults: the runner and the test guest of build/ (or $SOLSTICE_BUILD_DIR), size
# full (5 pairs). Prints a table and, with --json, writes the same as JSON. See
# BENCHMARKS.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
build_dir=${SOLSTICE_BUILD_DIR:-$repo/build}
runner="" guest_dir="" pass=()
while (($#)); do
  case "$1" in
    --build-dir) build_dir=$2; shift 2 ;;
    --runner) runner=$2; shift 2 ;;
    --guest-dir) guest_dir=$2; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
runner=${runner:-$build_dir/solstice-runner}
guest_dir=${guest_dir:-$build_dir/test-guest}

[[ -x "$runner" ]] || { echo "bench/run.sh: no runner at $runner (build it, or give --runner)" >&2; exit 2; }
[[ -f "$guest_dir/guest.json" ]] || {
  echo "bench/run.sh: no test guest in $guest_dir (deploy/test-guest/build.sh $guest_dir)" >&2; exit 2; }
for tool in python3 qemu-system-x86_64 qemu-img ssh sftp ssh-keygen xorriso; do
  command -v "$tool" > /dev/null || { echo "bench/run.sh: $tool is missing (deploy/install-deps.sh)" >&2; exit 2; }
done

exec python3 "$repo/bench/bench.py" --runner "$runner" --guest-dir "$guest_dir" "${pass[@]}"
