#!/usr/bin/env python3
"""Uploads into a TCG guest by SSH against uploads on a per-job read-only ISO, side by
side on one running guest (BENCHMARKS.md, "Uploads by ISO").

For each guest (the built-in test guest, the Debian cloud image) one VM is booted by
hand, as bench/baseline-job.sh boots it (same seed shape, same QEMU options), with
three extra IDE CD drives: two holding an ISO written before boot (one per size,
"attached at boot") and one empty drive for media inserted while the guest runs.
Then, round after round (the order of the methods rotating each round), every size
goes into the same destination by:

  runner_sftp   the runner's upload code (SshSession::upload_file: SFTP writes, then
                chmod) through bench/upload_probe, connection not timed
  openssh_sftp  `sftp -b` (put, chmod) over an OpenSSH connection master, as the
                existing upload benchmark does
  iso_boot      the ISO attached at boot: host time to write it with the runner's
                writer (measured before boot) + the runner's guest command
                (uploads_iso_command: one `sudo -n sh` finds the drive by its volume
                label and mounts it read-only, the user writes the file into place
                with `cat >` and chmods it, `sudo -n umount`)
  iso_hot       a new ISO written by the runner's writer, inserted into the empty
                drive with QMP blockdev-change-medium, then the same guest command

The guest's caches are dropped before every method (not timed). The first round
checks every result's sha256, mode and owner against the source. Ratios are
throughput against openssh_sftp of the same round, median over the rounds.

  bench/upload_iso.py --probe build/bench/upload_probe --guest-dir build/test-guest \
                      [--guests builtin,cloud] [--sizes 32,128] [--rounds 3] [--json OUT]
"""
import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20
MEMORY_MIB = 512  # as the existing transfer benchmarks (half of it is the test guest's /tmp)
DESTINATION = "/tmp/bench-upload.bin"
METHODS = ["runner_sftp", "openssh_sftp", "iso_boot", "iso_hot"]
HOT_DEVICE = "hotcd"


def log(message):
    print(f"[upload_iso {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(command, **kwargs):
    return subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)


class Qmp:
    def __init__(self, path, timeout_s=60):
        deadline = time.monotonic() + timeout_s
        while True:
            self.sock = socket.socket(socket.AF_UNIX)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.stream = self.sock.makefile("rw")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.stream.readline()
        if not line:
            raise RuntimeError("QMP closed")
        return json.loads(line)

    def execute(self, command, **arguments):
        self.stream.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.stream.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error']}")


def write_iso(probe, path, label, source):
    """The runner's writer; returns its own seconds (no program start)."""
    if os.path.exists(path):
        os.unlink(path)
    out = run([probe, "iso", path, label, source]).stdout
    os.chmod(path, 0o644)
    return json.loads(out)["seconds"]


class Guest:
    """One VM booted by hand with an OpenSSH connection master."""

    def __init__(self, name, disk, disk_format, work, boot_isos):
        self.name = name
        self.work = work
        vm = work
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", f"{vm}/userkey"])
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-host", "-f", f"{vm}/hostkey"])
        os.mkdir(f"{vm}/seed")
        with open(f"{vm}/seed/meta-data", "w") as f:
            f.write(f"instance-id: bench-{os.getpid()}\nlocal-hostname: bench\n")
        hostkey = open(f"{vm}/hostkey").read()
        with open(f"{vm}/seed/user-data", "w") as f:
            f.write("#cloud-config\nusers:\n  - name: runner\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n"
                    "    shell: /bin/sh\n    lock_passwd: true\n    ssh_authorized_keys:\n"
                    f"      - {open(f'{vm}/userkey.pub').read().strip()}\nssh_pwauth: false\n"
                    "ssh_keys:\n  ed25519_private: |\n" +
                    "".join(f"    {line}\n" for line in hostkey.splitlines()) +
                    f"  ed25519_public: {open(f'{vm}/hostkey.pub').read().strip()}\n")
        run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-R", "-o", f"{vm}/seed.iso",
             f"{vm}/seed"])
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", disk_format, "-b", os.path.abspath(disk),
             f"{vm}/overlay.qcow2"])
        argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(MEMORY_MIB),
                "-drive", f"file={vm}/overlay.qcow2,if=virtio,format=qcow2",
                "-drive", f"file={vm}/seed.iso,if=ide,index=0,media=cdrom,readonly=on,format=raw"]
        for index, iso in enumerate(boot_isos, start=1):
            argv += ["-drive", f"file={iso},if=ide,index={index},media=cdrom,readonly=on,format=raw"]
        # The empty drive media go into while the guest runs (secondary slave).
        argv += ["-drive", "if=none,id=hot0,readonly=on",
                 "-device", f"ide-cd,drive=hot0,id={HOT_DEVICE},bus=ide.1,unit=1",
                 "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:0-:22",
                 "-device", "virtio-net-pci,netdev=net0",
                 "-serial", f"file:{vm}/console.log",
                 "-chardev", f"socket,id=qmp0,path={vm}/qmp.sock,server=on,wait=off",
                 "-mon", "chardev=qmp0,mode=control"]
        started = time.monotonic()
        self.qemu = subprocess.Popen(["setsid", *argv], stderr=open(f"{vm}/qemu.stderr", "w"))
        self.qmp = Qmp(f"{vm}/qmp.sock")
        usernet = self.qmp.execute("human-monitor-command", **{"command-line": "info usernet"})
        self.port = int(next(l for l in usernet.splitlines() if "HOST_FORWARD" in l).split()[3])
        with open(f"{vm}/known_hosts", "w") as f:
            f.write(f"[127.0.0.1]:{self.port} {' '.join(open(f'{vm}/hostkey.pub').read().split()[:2])}\n")
        self.control = f"{vm}/control"
        self.ssh_opts = ["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
                         "-o", f"UserKnownHostsFile={vm}/known_hosts", "-o", "ConnectTimeout=5",
                         "-o", "LogLevel=ERROR", "-o", f"ControlPath={self.control}", "-i", f"{vm}/userkey"]
        while subprocess.run(["ssh", *self.ssh_opts, "-o", "ControlMaster=auto", "-o", "ControlPersist=3600",
                              "-p", str(self.port), "runner@127.0.0.1", "true"],
                             capture_output=True).returncode != 0:
            if self.qemu.poll() is not None:
                raise RuntimeError(f"{name}: QEMU exited during boot")
            if time.monotonic() - started > 600:
                raise RuntimeError(f"{name}: no SSH after 600 s")
            time.sleep(0.1)
        self.boot_s = time.monotonic() - started
        # A cloud-init guest: wait until it has finished (it restarts sshd meanwhile).
        self.ssh("if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null || true; fi")
        log(f"{name}: SSH ready after {self.boot_s:.1f} s (port {self.port})")

    def ssh(self, command, check=True):
        done = subprocess.run(["ssh", *self.ssh_opts, "-p", str(self.port), "runner@127.0.0.1", command],
                              capture_output=True, text=True)
        if check and done.returncode != 0:
            raise RuntimeError(f"{self.name}: `{command[:80]}` failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def stop(self):
        subprocess.run(["ssh", "-o", f"ControlPath={self.control}", "-O", "exit", "x"], capture_output=True)
        if self.qemu.poll() is None:
            try:
                self.qmp.execute("quit")
            except Exception:
                pass
            try:
                self.qemu.wait(30)
            except subprocess.TimeoutExpired:
                self.qemu.kill()
                self.qemu.wait()


def guest_iso_copy(probe, label):
    """The runner's own guest command (uploads_iso_command) for u0 of the ISO `label`."""
    return run([probe, "iso-command", label, DESTINATION, "644"]).stdout


def measure(guest, method, size, payload, probe, work, boot_write_s, round_index):
    label = f"UP{size}"
    guest.ssh(f"rm -f {DESTINATION}; sync; echo 3 | sudo -n tee /proc/sys/vm/drop_caches >/dev/null")
    detail = {}
    if method == "runner_sftp":
        out = run([probe, "sftp", str(guest.port), "runner", f"{guest.work}/userkey", payload, DESTINATION,
                   "644"]).stdout
        seconds = json.loads(out)["seconds"]
    elif method == "openssh_sftp":
        batch = os.path.join(work, "sftp-batch")
        with open(batch, "w") as f:
            f.write(f"put {payload} {DESTINATION}\nchmod 644 {DESTINATION}\n")
        t0 = time.monotonic()
        run(["sftp", "-q", *guest.ssh_opts, "-P", str(guest.port), "-b", batch, "runner@127.0.0.1"])
        seconds = time.monotonic() - t0
    elif method == "iso_boot":
        t0 = time.monotonic()
        guest.ssh(guest_iso_copy(probe, label))
        detail = {"host_write_s": boot_write_s, "guest_s": time.monotonic() - t0}
        seconds = boot_write_s + detail["guest_s"]
    else:  # iso_hot
        iso = os.path.join(work, f"hot-{size}-{round_index}.iso")
        hot_label = f"HOT{size}R{round_index}"
        write_s = write_iso(probe, iso, hot_label, payload)
        t0 = time.monotonic()
        guest.qmp.execute("blockdev-change-medium", id=HOT_DEVICE, filename=iso, format="raw",
                          **{"read-only-mode": "read-only"})
        t1 = time.monotonic()
        guest.ssh(guest_iso_copy(probe, hot_label))
        t2 = time.monotonic()
        detail = {"host_write_s": write_s, "change_medium_s": t1 - t0, "guest_s": t2 - t1}
        seconds = write_s + (t2 - t0)
        guest.qmp.execute("eject", id=HOT_DEVICE, force=True)
        os.unlink(iso)
    if round_index == 0:
        digest, mode_owner = guest.ssh(f"sha256sum {DESTINATION} | cut -d' ' -f1; "
                                       f"stat -c '%a %U' {DESTINATION}").split("\n")[:2]
        want = hashlib.sha256(open(payload, "rb").read()).hexdigest()
        if digest != want or mode_owner != "644 runner":
            raise RuntimeError(f"{guest.name} {method} {size} MiB: got sha256 {digest}, {mode_owner!r}; "
                               f"want {want}, '644 runner'")
        detail["checked"] = "sha256, mode 644, owner runner"
    return {"method": method, "size_mib": size, "round": round_index, "seconds": seconds,
            "mib_per_s": size / seconds, "load_average": os.getloadavg(), **detail}


def bench_guest(name, disk, disk_format, sizes, rounds, probe, work, payloads):
    gwork = os.path.join(work, name)
    os.mkdir(gwork)
    boot_isos, boot_write = [], {}
    for size in sizes:
        iso = os.path.join(gwork, f"boot-{size}.iso")
        boot_write[size] = write_iso(probe, iso, f"UP{size}", payloads[size])
        boot_isos.append(iso)
    guest = Guest(name, disk, disk_format, gwork, boot_isos)
    results = []
    try:
        for r in range(rounds):
            order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
            for size in sizes:
                for method in order:
                    row = measure(guest, method, size, payloads[size], probe, gwork, boot_write[size], r)
                    log(f"{name} round {r} {size} MiB {method}: {row['seconds']:.2f} s "
                        f"({row['mib_per_s']:.1f} MiB/s)")
                    results.append(row)
    finally:
        guest.stop()
    return {"guest": name, "boot_s": guest.boot_s, "iso_write_s_at_boot": boot_write, "rows": results}


def summarize(guest_result, sizes):
    lines = []
    rows = guest_result["rows"]
    for size in sizes:
        base = {r["round"]: r["seconds"] for r in rows if r["size_mib"] == size and r["method"] == "openssh_sftp"}
        for method in METHODS:
            mine = [r for r in rows if r["size_mib"] == size and r["method"] == method]
            if not mine:
                continue
            median_s = statistics.median(r["seconds"] for r in mine)
            ratio = statistics.median(base[r["round"]] / r["seconds"] for r in mine)
            parts = ""
            if method.startswith("iso"):
                parts = f"write {statistics.median(r['host_write_s'] for r in mine):.2f} s, guest " \
                        f"{statistics.median(r['guest_s'] for r in mine):.2f} s"
            lines.append({"guest": guest_result["guest"], "size_mib": size, "method": method,
                          "median_s": median_s, "mib_per_s": size / median_s, "ratio_vs_openssh_sftp": ratio,
                          "parts": parts})
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", required=True)
    parser.add_argument("--guest-dir", required=True)
    parser.add_argument("--guests", default="builtin,cloud")
    parser.add_argument("--sizes", default="32,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    guests = {"builtin": (os.path.join(args.guest_dir, "disk.raw"), "raw"),
              "cloud": (os.path.join(args.guest_dir, "cloud", "disk.qcow2"), "qcow2")}
    work = tempfile.mkdtemp(prefix="solstice-bench-upload-iso-")
    raw = {"machine": {"cpus": os.cpu_count(), "accel": "tcg", "kernel": platform.release(),
                       "load_average_at_start": os.getloadavg(),
                       "qemu": run(["qemu-system-x86_64", "--version"]).stdout.splitlines()[0],
                       "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()},
           "memory_mib": MEMORY_MIB, "destination": DESTINATION, "rounds": args.rounds, "guests": []}
    try:
        payloads = {}
        for size in sizes:
            payloads[size] = os.path.join(work, f"up{size}.bin")
            with open(payloads[size], "wb") as f:
                f.write(os.urandom(size * MIB))
        for name in args.guests.split(","):
            disk, disk_format = guests[name]
            raw["guests"].append(bench_guest(name, disk, disk_format, sizes, args.rounds, args.probe, work,
                                             payloads))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    raw["machine"]["load_average_at_end"] = os.getloadavg()
    summary = [line for g in raw["guests"] for line in summarize(g, sizes)]
    raw["summary"] = summary
    print(f"{'guest':8} {'MiB':>4} {'method':13} {'median s':>9} {'MiB/s':>7} {'ratio':>6}  parts")
    for s in summary:
        print(f"{s['guest']:8} {s['size_mib']:4} {s['method']:13} {s['median_s']:9.2f} {s['mib_per_s']:7.1f} "
              f"{s['ratio_vs_openssh_sftp']:6.2f}  {s['parts']}")
    print(f"load average at start {raw['machine']['load_average_at_start']}, "
          f"at end {raw['machine']['load_average_at_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
