#include "tests/reliability/qemu_wrappers.hpp"

#include <doctest/doctest.h>

#include <sys/stat.h>

#include <fstream>
#include <iterator>
#include <sstream>

namespace solstice::reliability {

namespace fs = std::filesystem;

namespace {

std::string read_text(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void replace_all(std::string& text, const std::string& from, const std::string& to) {
  for (auto at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
}

// Every wrapper starts here: where it logs, what the runner's argv asks for (the
// accelerator and the QMP socket), and the same argv rewritten to run on TCG.
constexpr const char* prelude = R"SH(#!/usr/bin/env bash
# Stand-in for qemu-system-x86_64, written by the reliability suite for one test
# (see tests/reliability/qemu_wrappers.hpp). It runs the real QEMU.
set -u
ulimit -c 0  # a QEMU aborted on purpose leaves no core file
dir='@DIR@'
log="$dir/wrapper.log"
# The runner asks the version as itself (root) for template keys: not a VM, not
# logged (a log file made by root would be closed to QEMU's user).
case "${1:-}" in --version) exec qemu-system-x86_64 "$@" ;; esac

# The accelerator, and the QMP socket: a socket chardev named by
# `-mon chardev=ID,mode=control`, or `-qmp unix:PATH`.
accel=tcg qmp_sock= qmp_id= prev=
declare -A socket_paths=()
for a in "$@"; do
  case "$prev" in
    -accel) accel=${a%%,*} ;;
    -chardev)
      case "$a" in
        socket,*) id=${a#*id=}; p=${a#*path=}; socket_paths[${id%%,*}]=${p%%,*} ;;
      esac ;;
    -mon) case "$a" in *mode=control*) qmp_id=${a#*chardev=}; qmp_id=${qmp_id%%,*} ;; esac ;;
    -qmp) case "$a" in unix:*) p=${a#unix:}; qmp_sock=${p%%,*} ;; esac ;;
  esac
  prev=$a
done
[ -n "$qmp_id" ] && qmp_sock=${socket_paths[$qmp_id]:-}

# The same VM on TCG: -accel kvm becomes tcg, -cpu host becomes max.
on_tcg=() prev=
for a in "$@"; do
  case "$prev" in
    -accel) [ "${a%%,*}" = kvm ] && a=tcg ;;
    -cpu) [ "$a" = host ] && a=max ;;
  esac
  on_tcg+=("$a")
  prev=$a
done

echo "start $accel $EPOCHREALTIME" >>"$log"
)SH";

// Helpers of the KVM failure shapes; a TCG attempt is the real QEMU, untouched.
constexpr const char* kvm_helpers = R"SH(
[ "$accel" = kvm ] || exec qemu-system-x86_64 "$@"

# What QEMU prints when KVM refuses the vCPU's MSRs, before it aborts.
abort_message() {
  echo "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x2000000000000e3" >&2
  echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3090: kvm_buf_set_msrs: Assertion \`ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
}

# True once a client (the runner) is connected to the unix socket at $1: the
# accepted socket shows the path in state 03 (connected).
client_connected() {
  awk -v path="$1" '$6 == "03" && $8 == path { found = 1 } END { exit !found }' /proc/net/unix
}

# Run in a child of QEMU (whose PID is $$ once the wrapper has exec'd it): waits for
# the runner's QMP connection; false when QEMU is gone first.
wait_for_qmp_client() {
  local i
  for ((i = 0; i < 3000; i++)); do
    kill -0 $$ 2>/dev/null || return 1
    client_connected "$qmp_sock" && return 0
    sleep 0.05
  done
  return 1
}
)SH";

constexpr const char* abort_at_once = R"SH(
# QEMU makes its QMP socket (listening; nobody answers, its main loop never runs)
# before it sets the vCPUs up and aborts there, 0.05-0.1 s after its start.
echo "fault abort $EPOCHREALTIME" >>"$log"
abort_message
exec python3 -c '
import os, socket, sys, time
if sys.argv[1]:
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    s.listen(1)
time.sleep(0.05)
os.abort()' "$qmp_sock"
)SH";

constexpr const char* abort_before_socket = R"SH(
# The same abort before QEMU has made any socket.
echo "fault abort $EPOCHREALTIME" >>"$log"
abort_message
kill -ABRT $$
exit 134
)SH";

constexpr const char* abort_after_qmp_connect = R"SH(
(
  wait_for_qmp_client || exit 0
  sleep 1
  kill -0 $$ 2>/dev/null || exit 0
  echo "fault abort $EPOCHREALTIME" >>"$log"
  abort_message
  kill -ABRT $$
) &
exec qemu-system-x86_64 "${on_tcg[@]}"
)SH";

constexpr const char* stop_vm = R"SH(
monitor="$dir/wrapper-qmp-$$.sock"
(
  wait_for_qmp_client || exit 0
  sleep 1
  kill -0 $$ 2>/dev/null || exit 0
  exec python3 - "$monitor" "$log" <<'PY'
import json, socket, sys, time

path, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
f = s.makefile("rw")
json.loads(f.readline())  # the greeting

def execute(name):
    f.write(json.dumps({"execute": name}) + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "return" in reply or "error" in reply:
            return reply

execute("qmp_capabilities")
with open(log, "a") as out:
    out.write("fault stop %.6f\n" % time.time())
# What QEMU prints when KVM_RUN fails with an internal error; then it stops the VM.
sys.stderr.write("KVM internal error. Suberror: 1\nemulation failure\n")
sys.stderr.flush()
execute("stop")
PY
) &
exec qemu-system-x86_64 "${on_tcg[@]}" -qmp "unix:$monitor,server=on,wait=off"
)SH";

constexpr const char* qmp_proxy = R"SH(
[ -n "$qmp_sock" ] || exec qemu-system-x86_64 "$@"
job=$(basename "$(dirname "$qmp_sock")")
real="$qmp_sock.real"
args=()
for a in "$@"; do args+=("${a/"$qmp_sock"/"$real"}"); done

python3 - qmp-proxy "$qmp_sock" "$real" <<'PY' &
import os, select, socket, sys, time

listen_path, real_path = sys.argv[2], sys.argv[3]
qemu = os.getppid()  # the wrapper, about to become QEMU
server = socket.socket(socket.AF_UNIX)
server.bind(listen_path)
server.listen(8)
peer = {}

def connect_real():
    for _ in range(400):
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(real_path)
            return s
        except OSError:
            s.close()
            if os.getppid() != qemu:
                return None
            time.sleep(0.05)
    return None

def drop(s):
    other = peer.pop(s, None)
    s.close()
    if other is not None:
        peer.pop(other, None)
        other.close()

# Ends with QEMU, which is then no longer this process's parent.
while os.getppid() == qemu:
    ready, _, _ = select.select([server, *peer], [], [], 0.2)
    for s in ready:
        if s is server:
            client, _ = server.accept()
            upstream = connect_real()
            if upstream is None:
                client.close()
            else:
                peer[client], peer[upstream] = upstream, client
        elif s in peer:
            try:
                data = s.recv(65536)
                if data:
                    peer[s].sendall(data)
                    continue
            except OSError:
                pass
            drop(s)
PY
echo $! >"$dir/qmp-proxy-$job.pid"
# QEMU starts once the proxy listens: the runner connects as soon as QEMU runs.
for ((i = 0; i < 200; i++)); do [ -S "$qmp_sock" ] && break; sleep 0.05; done
exec qemu-system-x86_64 "${args[@]}"
)SH";

fs::path write_script(const Sandbox& sandbox, const std::string& name, std::string text) {
  replace_all(text, "@DIR@", sandbox.root().string());
  auto path = sandbox.write(name, text);
  REQUIRE(::chmod(path.c_str(), 0755) == 0);
  return path;
}

}  // namespace

const char* describe(KvmFailure failure) {
  switch (failure) {
    case KvmFailure::abort_at_once: return "aborts at once";
    case KvmFailure::abort_before_socket: return "aborts at once, before its QMP socket exists";
    case KvmFailure::abort_after_qmp_connect: return "aborts after QMP connects";
    case KvmFailure::stop_vm: return "stops the VM";
  }
  return "?";
}

fs::path write_kvm_failure_wrapper(const Sandbox& sandbox, KvmFailure failure) {
  std::string text = std::string(prelude) + kvm_helpers;
  switch (failure) {
    case KvmFailure::abort_at_once: text += abort_at_once; break;
    case KvmFailure::abort_before_socket: text += abort_before_socket; break;
    case KvmFailure::abort_after_qmp_connect: text += abort_after_qmp_connect; break;
    case KvmFailure::stop_vm: text += stop_vm; break;
  }
  return write_script(sandbox, "qemu-kvm-broken", text);
}

fs::path write_qmp_proxy_wrapper(const Sandbox& sandbox) {
  return write_script(sandbox, "qemu-qmp-proxy", std::string(prelude) + qmp_proxy);
}

fs::path proxy_pid_file(const Sandbox& sandbox, const std::string& job_id) {
  return sandbox.root() / ("qmp-proxy-" + job_id + ".pid");
}

std::optional<pid_t> qmp_proxy_pid(const Sandbox& sandbox, const std::string& job_id) {
  auto text = read_text(proxy_pid_file(sandbox, job_id));
  if (text.empty() || text.back() != '\n')
    return std::nullopt;
  pid_t pid = std::stoi(text);
  if (pid <= 0 || process_gone(pid))
    return std::nullopt;
  auto args = read_text("/proc/" + std::to_string(pid) + "/cmdline");
  if (args.find("qmp-proxy") == std::string::npos ||
      args.find(sandbox.root().string()) == std::string::npos)
    return std::nullopt;
  return pid;
}

fs::path write_fake_kvm_device(const Sandbox& sandbox) {
  auto path = sandbox.write("fake-kvm", "");
  REQUIRE(::chmod(path.c_str(), 0600) == 0);
  return path;
}

WrapperLog read_wrapper_log(const Sandbox& sandbox) {
  WrapperLog log;
  log.text = read_text(sandbox.root() / "wrapper.log");
  std::istringstream lines(log.text);
  std::string kind, what;
  double at = 0;
  while (lines >> kind >> what >> at) {
    if (kind == "start")
      log.accels.push_back(what);
    else if (kind == "fault" && !log.fault_at)
      log.fault_at = at;
  }
  return log;
}

fs::path write_runner_config(const Sandbox& sandbox, const nlohmann::json& extra,
                             const std::string& name) {
  nlohmann::json config = {{"boot_timeout_seconds", 240}, {"powerdown_timeout_seconds", 20}};
  config.update(extra);
  return sandbox.write_json(name, config);
}

}  // namespace solstice::reliability
