#!/usr/bin/env bash
# The hand-made alternative to one runner job: fresh keys and a NoCloud seed made
# with the usual tools, a qcow2 overlay, QEMU started with the runner's own argv,
# the OpenSSH client polled every 20 ms until a command succeeds, the step run,
# the guest powered off through QMP, QEMU awaited, everything removed.
#
# Usage: baseline-job.sh --work DIR --disk FILE [--disk-format raw] [--user runner]
#          [--memory 256] [--vcpus 1] [--machine pc] [--kernel K --initrd I --append A]
#          [--upload LOCAL:REMOTE] [--step 'guest command'] [--step-out FILE]
#
# Writes DIR/times.env (epoch microseconds of each stage) and DIR/qemu-argv (the
# QEMU argv, NUL-separated). DIR must exist and be empty; the caller removes it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work="" disk="" disk_format=raw user=runner memory=256 vcpus=1 machine=pc
kernel="" initrd="" append="" upload="" step=true step_out=/dev/null
while (($#)); do
  case "$1" in
    --work) work=$2 ;;
    --disk) disk=$2 ;;
    --disk-format) disk_format=$2 ;;
    --user) user=$2 ;;
    --memory) memory=$2 ;;
    --vcpus) vcpus=$2 ;;
    --machine) machine=$2 ;;
    --kernel) kernel=$2 ;;
    --initrd) initrd=$2 ;;
    --append) append=$2 ;;
    --upload) upload=$2 ;;
    --step) step=$2 ;;
    --step-out) step_out=$2 ;;
    *) echo "baseline-job.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
[[ -n "$work" && -d "$work" ]] || { echo "baseline-job.sh: --work DIR must exist" >&2; exit 2; }
[[ -n "$disk" || -n "$kernel" ]] || { echo "baseline-job.sh: --disk or --kernel is needed" >&2; exit 2; }

now_us() { echo $(($(date +%s%N) / 1000)); }
stamp() { echo "$1=$(now_us)" >> "$work/times.env"; }

qemu_pid="" watcher_pid="" control="$work/ssh-control"
cleanup() {
  [[ -S "$control" ]] && ssh -o ControlPath="$control" -O exit x 2>/dev/null || true
  if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then
    kill -KILL "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
  fi
  [[ -n "$watcher_pid" ]] && kill "$watcher_pid" 2>/dev/null || true
  rm -rf "$work/vm"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stamp start
vm="$work/vm"
mkdir -m 700 "$vm" "$vm/seed"

# Keys: the job's key and the guest's host key, fresh per job.
ssh-keygen -q -t ed25519 -N '' -C baseline-job -f "$vm/userkey"
ssh-keygen -q -t ed25519 -N '' -C baseline-host -f "$vm/hostkey"
# The same user-data shape the runner writes (runtime/vm/cloud_init.cpp).
printf 'instance-id: baseline-%s\nlocal-hostname: baseline\n' "$$" > "$vm/seed/meta-data"
{
  echo "#cloud-config"
  echo "users:"
  echo "  - name: $user"
  echo '    sudo: "ALL=(ALL) NOPASSWD:ALL"'
  echo "    shell: /bin/sh"
  echo "    lock_passwd: true"
  echo "    ssh_authorized_keys:"
  echo "      - $(cat "$vm/userkey.pub")"
  echo "ssh_pwauth: false"
  echo "ssh_keys:"
  echo "  ed25519_private: |"
  sed 's/^/    /' "$vm/hostkey"
  echo "  ed25519_public: $(cat "$vm/hostkey.pub")"
} > "$vm/seed/user-data"
xorriso -as mkisofs -quiet -V cidata -J -R -o "$vm/seed.iso" "$vm/seed" 2>/dev/null
argv=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
  -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny
  -machine "$machine" -accel tcg -cpu max -smp "$vcpus" -m "$memory")
if [[ -n "$disk" ]]; then
  qemu-img create -q -f qcow2 -F "$disk_format" -b "$(readlink -f "$disk")" "$vm/overlay.qcow2"
  argv+=(-drive "file=$vm/overlay.qcow2,if=virtio,format=qcow2")
fi
argv+=(-drive "file=$vm/seed.iso,if=ide,media=cdrom,readonly=on,format=raw"
  -drive "if=none,id=uploads-medium,readonly=on" -device "ide-cd,drive=uploads-medium,bus=ide.1,unit=0,id=uploads"
  -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22" -device "virtio-net-pci,netdev=net0"
  -add-fd fd=3,set=1,opaque=console -chardev "file,id=console0,path=/dev/fdset/1" -serial chardev:console0
  -chardev "socket,id=qmp0,path=$vm/qmp.sock,server=on,wait=off" -mon "chardev=qmp0,mode=control")
if [[ -n "$kernel" ]]; then
  argv+=(-kernel "$kernel")
  [[ -n "$initrd" ]] && argv+=(-initrd "$initrd")
  [[ -n "$append" ]] && argv+=(-append "$append")
fi
printf '%s\0' "${argv[@]}" > "$work/qemu-argv"
: > "$work/console.log"
stamp prepared

# The console marker's time, for the readiness gap (tail -F follows with inotify).
(grep -a -m1 -q 'SOLSTICE-GUEST: sshd started' < <(tail --pid=$$ -n +1 -F "$work/console.log" 2>/dev/null) \
  && stamp marker) &
watcher_pid=$!

# In its own session, as the runner starts it (runtime/base/child_process.cpp): on Linux
# a session is also a scheduler autogroup, and on a busy host the group QEMU sits in
# changes guest speed several-fold, so both must place QEMU the same way. (setsid
# does not fork here: a non-interactive shell's background child leads no group.)
setsid "${argv[@]}" 2> "$work/qemu.stderr" 3>> "$work/console.log" &
qemu_pid=$!
echo "qemu_pid=$qemu_pid" >> "$work/times.env"
stamp qemu_started
port=$(python3 "$here/qmp.py" "$vm/qmp.sock" port)
echo "[127.0.0.1]:$port $(cut -d' ' -f1,2 "$vm/hostkey.pub")" > "$vm/known_hosts"
ssh_opts=(-o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes
  -o UserKnownHostsFile="$vm/known_hosts" -o ConnectTimeout=2 -o LogLevel=ERROR
  -o ControlPath="$control" -i "$vm/userkey")

# Ready = a command succeeded. The first success leaves a connection master that the
# later commands reuse, as the runner keeps its session.
until ssh "${ssh_opts[@]}" -o ControlMaster=auto -o ControlPersist=120 -p "$port" \
    "$user@127.0.0.1" true 2>/dev/null; do
  kill -0 "$qemu_pid" 2>/dev/null || { echo "baseline-job.sh: QEMU exited during boot" >&2; exit 1; }
  sleep 0.02
done
stamp ready

if [[ -n "$upload" ]]; then
  stamp upload_start
  printf 'put %s %s\n' "${upload%%:*}" "${upload#*:}" > "$vm/sftp-batch"
  sftp -q "${ssh_opts[@]}" -P "$port" -b "$vm/sftp-batch" "$user@127.0.0.1" > /dev/null
  stamp upload_end
fi

stamp step_start
ssh "${ssh_opts[@]}" -p "$port" "$user@127.0.0.1" "$step" > "$step_out"
stamp step_end

ssh -o ControlPath="$control" -O exit x 2>/dev/null || true
stamp powerdown
python3 "$here/qmp.py" "$vm/qmp.sock" powerdown
for _ in $(seq 3000); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.01; done
if kill -0 "$qemu_pid" 2>/dev/null; then
  echo "baseline-job.sh: the guest did not power off within 30 s" >&2
  exit 1
fi
wait "$qemu_pid" || true
qemu_pid=""
stamp exited
rm -rf "$vm"
stamp end
