#!/usr/bin/env bash
# The .deb, end to end on this machine (a throw-away CI host): CPack builds it from
# this build tree, `dpkg -i` installs it into the real system, the installed
# binary prints its version and the git commit this build was made from, the installed
# units pass `systemd-analyze verify`, the sysusers/tmpfiles files made their
# user and state directory, and `dpkg -P` takes it all away again. What the
# package made that was not here before (the user, the state directory) is
# removed too. Usage: deb_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build_dir=$(realpath "$1")
source_dir=$(realpath "$2")
fail() { echo "FAIL: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || { echo "SKIP: dpkg -i needs root"; exit 77; }
if dpkg-query -W -f='${Status}' solstice-runner 2>/dev/null | grep -q "ok installed"; then
  fail "a solstice-runner package is installed already; this test does not replace it"
fi

work=$(mktemp -d)
had_user=$(getent passwd solstice >/dev/null && echo yes || echo no)
had_kvm=$(getent group kvm >/dev/null && echo yes || echo no)
had_state_dir=$([[ -e /var/lib/solstice-runner ]] && echo yes || echo no)
installed=no
cleanup() {
  if [[ $installed == yes ]]; then
    dpkg -P solstice-runner >/dev/null || echo "cleanup: dpkg -P failed" >&2
  fi
  if [[ $had_user == no ]] && getent passwd solstice >/dev/null; then
    userdel solstice || true
  fi
  if [[ $had_kvm == no ]] && getent group kvm >/dev/null; then
    groupdel kvm || true
  fi
  if [[ $had_state_dir == no ]]; then
    rmdir /var/lib/solstice-runner 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== cpack"
(cd "$work" && cpack -G DEB --config "$build_dir/CPackConfig.cmake" -B "$work" >cpack.log 2>&1) ||
  { cat "$work/cpack.log"; fail "cpack failed"; }
deb=$(ls "$work"/solstice-runner_*.deb)
prefix=$(sed -n 's/^set(CPACK_PACKAGING_INSTALL_PREFIX "\(.*\)")$/\1/p' "$build_dir/CPackConfig.cmake")
[[ -n $prefix ]] || fail "no CPACK_PACKAGING_INSTALL_PREFIX in CPackConfig.cmake"
depends=$(dpkg-deb -f "$deb" Depends)
for dep in qemu-system-x86 qemu-utils libcaf-core0.17 libssh2-1 libprotobuf; do
  [[ $depends == *"$dep"* ]] || fail "Depends lacks $dep: $depends"
done

echo "== dpkg -i $(basename "$deb")"
installed=yes
dpkg -i "$deb" || fail "dpkg -i failed"
bin=$prefix/bin/solstice-runner
[[ -x $bin ]] || fail "$bin is not installed"

echo "== $bin --version"
version=$("$bin" --version)
echo "$version"
project_version=$(sed -n 's/^project(solstice_runner VERSION \([0-9.]*\).*/\1/p' "$source_dir/CMakeLists.txt")
[[ $version == *"$project_version"* ]] || fail "--version does not name version $project_version"
# The commit this build was made from (cmake/version.cmake), a real one of the tree.
commit=$(sed -n 's/.*runner_commit() { return "\([0-9a-f]\{12\}\)\(-dirty\)\?"; }.*/\1/p' \
  "$build_dir/runtime/generated/version.cpp")
[[ -n $commit ]] || fail "the build names no git commit (runtime/generated/version.cpp)"
git -C "$source_dir" cat-file -e "$commit^{commit}" || fail "$commit is not a commit of the tree"
[[ $version == *"commit $commit"* ]] || fail "--version does not name commit $commit"

echo "== systemd-analyze verify"
units=("$prefix"/lib/systemd/system/solstice-{node,coordinator}.service)
for unit in "${units[@]}"; do
  [[ -f $unit ]] || fail "$unit is not installed"
  grep -q "^ExecStart=$bin " "$unit" || fail "$unit does not run $bin"
done
systemd-analyze verify "${units[@]}" || fail "systemd-analyze verify rejects the units"

echo "== users, state dir, config, man page, completion"
getent passwd solstice >/dev/null || fail "sysusers did not make the user solstice"
getent passwd solstice-qemu >/dev/null || fail "sysusers did not make the user solstice-qemu"
[[ $(stat -c %U:%a /var/lib/solstice-runner) == solstice:700 ]] ||
  fail "state dir: $(stat -c %U:%a /var/lib/solstice-runner), want solstice:700"
[[ -f /etc/solstice-runner/config.json ]] || fail "no /etc/solstice-runner/config.json"
"$bin" run --help | grep -q "/etc/solstice-runner/config.json" ||
  fail "run --help does not name the default config"
# `run` reads the installed config when no --config is given: its label debian-12
# (only there) is known, and its disk named. (Read, never edited: other runners on
# this host may read the file meanwhile.)
out=$("$bin" run --runs-on debian-12 --script "$source_dir/examples/hello.sh" 2>&1) &&
  fail "run on the example's image that is not there exited 0"
[[ $out == *"debian-12-genericcloud-amd64.qcow2"* && $out != *"no image has this label"* ]] ||
  fail "run did not read the default config: $out"
# `jobs` alone names its commands (exit 2, invalid input).
out=$("$bin" jobs 2>&1) && fail "'jobs' without a command exited 0"
for command in list show logs cancel; do
  [[ $out == *"  $command "* ]] || fail "'jobs' alone does not name '$command': $out"
done
man -w solstice-runner >/dev/null || fail "man solstice-runner finds no page"
bash -c "source /usr/share/bash-completion/bash_completion &&
         source $prefix/share/bash-completion/completions/solstice-runner &&
         COMP_LINE='solstice-runner jo'; COMP_POINT=18; COMP_WORDS=(solstice-runner jo);
         COMP_CWORD=1; _solstice_runner &&
         [[ \${COMPREPLY[*]} == jobs ]]" || fail "bash completion does not complete 'jo' to 'jobs'"

echo "== dpkg -P"
dpkg -P solstice-runner || fail "dpkg -P failed"
installed=no
[[ ! -e $bin && ! -e /etc/solstice-runner/config.json ]] || fail "dpkg -P left files behind"
echo "PASS"
