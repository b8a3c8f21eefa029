#!/usr/bin/env python3
"""Solstice Runner against the hand-made alternative (QEMU + OpenSSH), side by side.

Each benchmark alternates a runner job and a baseline job (bench/baseline-job.sh) on
the same guest, pair after pair, flipping which goes first, and reports medians and
the median of the per-pair ratios. Run through bench/run.sh; see BENCHMARKS.md.
"""
import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MARKER = b"SOLSTICE-GUEST: sshd started"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

SIZES = {
    # stream and upload sizes in MiB, concurrency levels of the scale test
    "tiny": {"stream_mib": 8, "upload_mib": 8, "scale": [1, 2], "pairs": 1},
    "full": {"stream_mib": 256, "upload_mib": 128, "scale": [1, 2, 4, 8], "pairs": 5},
}
# The upload lands in the guest's /tmp (a tmpfs of half the guest's memory).
TRANSFER_MEMORY_MIB = 512
JOB_TIMEOUT_S = 1800


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def now_us():
    return time.time_ns() // 1000


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------- /proc


def read_proc_cpu_s(pid):
    """utime + stime of the process itself (its threads; children excluded)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def read_vm_hwm_kib(pid):
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children_of(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                head, tail = f.read().rsplit(b")", 1)
            if int(tail.split()[1]) == pid:
                found.append((int(entry), head.split(b"(", 1)[1].decode(errors="replace")))
        except (OSError, IndexError, ValueError):
            continue
    return found


def read_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return None


class ProcessWatch:
    """Samples a process every `interval` s: its own CPU, VmHWM, and its QEMU child
    (argv once, CPU until it goes). Optionally watches a console log for the sshd
    marker and records the wall-clock time it first appears."""

    def __init__(self, pid, console_log=None, interval=0.02, console_interval=0.002):
        self.pid = pid
        self.console_log = console_log
        self.interval = interval
        self.console_interval = console_interval
        self.cpu_s = None
        self.hwm_kib = None
        self.qemu_pid = None
        self.qemu_argv = None
        self.qemu_cpu_s = None
        self.marker_us = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True)]
        if console_log:
            self._threads.append(threading.Thread(target=self._watch_console, daemon=True))
        for t in self._threads:
            t.start()

    def _sample(self):
        while not self._stop.is_set():
            cpu = read_proc_cpu_s(self.pid)
            if cpu is not None:
                self.cpu_s = cpu
            hwm = read_vm_hwm_kib(self.pid)
            if hwm is not None:
                self.hwm_kib = max(hwm, self.hwm_kib or 0)
            if self.qemu_pid is None:
                for child, comm in children_of(self.pid):
                    if comm.startswith("qemu-system"):
                        self.qemu_pid = child
                        self.qemu_argv = read_cmdline(child)
            if self.qemu_pid is not None:
                qemu_cpu = read_proc_cpu_s(self.qemu_pid)
                if qemu_cpu is not None:
                    self.qemu_cpu_s = qemu_cpu
            self._stop.wait(self.interval)

    def _watch_console(self):
        data = b""
        handle = None
        while not self._stop.is_set() and self.marker_us is None:
            if handle is None:
                try:
                    handle = open(self.console_log, "rb")
                except OSError:
                    self._stop.wait(self.console_interval)
                    continue
            chunk = handle.read()
            if chunk:
                data = data[-len(MARKER):] + chunk
                if MARKER in data:
                    self.marker_us = now_us()
                    break
            else:
                self._stop.wait(self.console_interval)
        if handle:
            handle.close()

    def finish(self, exited_pid_stat=True):
        """Call once the process has exited but is not reaped yet (zombie): its
        /proc/PID/stat still holds the final CPU times."""
        if exited_pid_stat:
            cpu = read_proc_cpu_s(self.pid)
            if cpu is not None:
                self.cpu_s = cpu
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)


# Runner processes and baseline scripts still running, ended if the benchmark is.
LIVE = set()


def end_live_children():
    for process in list(LIVE):
        try:
            process.terminate()
        except OSError:
            pass


def wait_unreaped(pid):
    """Blocks until `pid` exits, leaving it a zombie so /proc/PID/stat stays readable."""
    while True:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            return
        except InterruptedError:
            continue
        except ChildProcessError:
            return


# ----------------------------------------------------------------------------- runner


class Bench:
    def __init__(self, args):
        self.args = args
        self.runner = os.path.abspath(args.runner)
        self.guest_dir = os.path.abspath(args.guest_dir)
        with open(os.path.join(self.guest_dir, "guest.json")) as f:
            self.guest = json.load(f)
        self.work = tempfile.mkdtemp(prefix="solstice-bench-")
        # Searchable: a root runner's QEMU runs as qemu_user and must reach the state dir.
        os.chmod(self.work, 0o711)
        self.state_dir = os.path.join(self.work, "state")
        os.mkdir(self.state_dir, 0o700)
        self.job_counter = 0
        self.argv_checks = []
        self.env = dict(os.environ, SOLSTICE_TEST_GUEST_DIR=self.guest_dir)

    def cleanup(self):
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- runner jobs

    def runner_job(self, steps, uploads=(), memory_mib=0, stream_to=None, tag="job"):
        """Runs one job through `solstice-runner run` and returns its measurements.
        `stream_to`: a file that receives the runner's terminal output, read through
        a pipe so the arrival of the step's start and end lines can be timed."""
        self.job_counter += 1
        job_id = f"bench-{os.getpid()}-{self.job_counter}-{tag}"
        spec = {"id": job_id, "name": tag, "runs_on": "solstice-test-guest",
                "timeout_seconds": JOB_TIMEOUT_S, "steps": steps}
        if uploads:
            spec["uploads"] = list(uploads)
        if memory_mib:
            spec["memory_mib"] = memory_mib
        job_file = os.path.join(self.work, f"{job_id}.json")
        with open(job_file, "w") as f:
            json.dump(spec, f)
        job_dir = os.path.join(self.state_dir, "jobs", job_id)
        out_path = os.path.join(self.work, f"{job_id}.out")
        # Cold boots: these rows compare the runner's boot with the baseline's (restored
        # jobs are measured by bench/restore.py).
        command = [self.runner, "run", job_file, "--state-dir", self.state_dir, "--accel", "tcg",
                   "--cold"]
        started_us = now_us()
        out_file = open(out_path, "wb")
        process = subprocess.Popen(command, stdout=subprocess.PIPE if stream_to else out_file,
                                   stderr=subprocess.STDOUT if not stream_to else out_file,
                                   env=self.env)
        LIVE.add(process)
        watch = ProcessWatch(process.pid, os.path.join(job_dir, "console.log"))
        reader = None
        arrivals = {}
        if stream_to:
            reader = threading.Thread(target=self._read_terminal,
                                      args=(process.stdout, stream_to, arrivals), daemon=True)
            reader.start()
        wait_unreaped(process.pid)
        ended_us = now_us()
        watch.finish()
        process.wait()
        LIVE.discard(process)
        if reader:
            reader.join()
        out_file.close()
        result = {"kind": "runner", "tag": tag, "exit_code": process.returncode,
                  "wall_s": (ended_us - started_us) / 1e6, "cpu_s": watch.cpu_s,
                  "hwm_kib": watch.hwm_kib, "qemu_cpu_s": watch.qemu_cpu_s,
                  "marker_watch_us": watch.marker_us, "qemu_argv": watch.qemu_argv,
                  "started_us": started_us, "ended_us": ended_us}
        result.update(self._runner_events(os.path.join(job_dir, "events.jsonl")))
        result["arrival_step_start_us"] = arrivals.get("step_start")
        result["arrival_step_end_us"] = arrivals.get("step_end")
        result["terminal_zero_bytes"] = arrivals.get("zero_bytes")
        if process.returncode != 0:
            with open(out_path, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"runner job {job_id} failed with exit code "
                               f"{process.returncode}:\n{tail}")
        if not self.args.keep:
            shutil.rmtree(job_dir, ignore_errors=True)
            os.unlink(out_path)
            os.unlink(job_file)
        return result

    def runner_jobs_together(self, steps, n, tag="job"):
        """Runs `n` copies of a job in ONE `solstice-runner run` process (n job
        files, with max_concurrent_vms = n so none waits for a VM slot) and returns
        that process's wall time, own CPU and peak RSS, and each job's events."""
        self.job_counter += 1
        run_id = f"bench-{os.getpid()}-{self.job_counter}-{tag}"
        job_ids = [f"{run_id}-{k + 1}" for k in range(n)]
        job_files = []
        for k, job_id in enumerate(job_ids):
            spec = {"id": job_id, "name": f"{tag}-{k + 1}", "runs_on": "solstice-test-guest",
                    "timeout_seconds": JOB_TIMEOUT_S, "steps": steps}
            job_files.append(os.path.join(self.work, f"{job_id}.json"))
            with open(job_files[-1], "w") as f:
                json.dump(spec, f)
        config_file = os.path.join(self.work, f"{run_id}-config.json")
        with open(config_file, "w") as f:
            json.dump({"max_concurrent_vms": n}, f)
        out_path = os.path.join(self.work, f"{run_id}.out")
        command = [self.runner, "run", *job_files, "--config", config_file,
                   "--state-dir", self.state_dir, "--accel", "tcg", "--cold"]
        started_us = now_us()
        with open(out_path, "wb") as out_file:
            process = subprocess.Popen(command, stdout=out_file, stderr=subprocess.STDOUT,
                                       env=self.env)
            LIVE.add(process)
            watch = ProcessWatch(process.pid)
            wait_unreaped(process.pid)
            ended_us = now_us()
            watch.finish()
            process.wait()
            LIVE.discard(process)
        if process.returncode != 0:
            with open(out_path, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"runner run {run_id} ({n} jobs) failed with exit code "
                               f"{process.returncode}:\n{tail}")
        jobs = []
        for job_id in job_ids:
            job_dir = os.path.join(self.state_dir, "jobs", job_id)
            events = self._runner_events(os.path.join(job_dir, "events.jsonl"))
            jobs.append({"job_id": job_id, "status": events["status"], "states": events["states"]})
            if not self.args.keep:
                shutil.rmtree(job_dir, ignore_errors=True)
        if not self.args.keep:
            for path in job_files + [config_file, out_path]:
                os.unlink(path)
        return {"kind": "runner", "tag": tag, "n": n, "exit_code": process.returncode,
                "wall_s": (ended_us - started_us) / 1e6, "cpu_s": watch.cpu_s,
                "hwm_kib": watch.hwm_kib, "started_us": started_us, "ended_us": ended_us,
                "jobs": jobs}

    @staticmethod
    def _read_terminal(pipe, path, arrivals):
        """Copies the runner's terminal output to `path`, noting when the step's
        start (==>) and end (<==) lines arrive and counting the NUL bytes between."""
        tail = b""
        zeros = 0
        with open(path, "wb") as out:
            while True:
                chunk = pipe.read1(1 << 20)
                if not chunk:
                    break
                at = now_us()
                out.write(chunk)
                zeros += chunk.count(b"\0")
                window = tail + chunk
                if "step_start" not in arrivals and b"==> step" in window:
                    arrivals["step_start"] = at
                if "step_end" not in arrivals and b"<== step" in window:
                    arrivals["step_end"] = at
                tail = window[-16:]
        arrivals["zero_bytes"] = zeros

    @staticmethod
    def _runner_events(path):
        """The timestamps that matter, from the job's own event log."""
        found = {"states": {}, "phases": {}, "console_marker_us": None, "step_started_us": None,
                 "step_finished_us": None, "stdout_bytes": 0, "status": None}
        with open(path, "rb") as f:
            for line in f:
                if b'"output"' in line[:200]:
                    event = json.loads(line)
                    if event["output"].get("stream") == "STDOUT":
                        found["stdout_bytes"] += len(base64.b64decode(event["output"].get("data", "")))
                    continue
                event = json.loads(line)
                ts = int(event["timestamp_us"])
                if "state" in event:
                    found["states"].setdefault(event["state"].get("state"), ts)
                elif "console" in event:
                    if (found["console_marker_us"] is None
                            and MARKER in base64.b64decode(event["console"].get("line", ""))):
                        found["console_marker_us"] = ts
                elif "step_started" in event:
                    if found["step_started_us"] is None:
                        found["step_started_us"] = ts
                elif "step_finished" in event:
                    found["step_finished_us"] = ts
                elif "result" in event:
                    found["status"] = event["result"].get("status")
                    for phase in event["result"].get("phases", []):
                        found["phases"][phase["phase"]] = int(phase.get("duration_ms", 0))
        return found

    # -- baseline jobs

    def baseline_job(self, memory_mib=0, upload=None, step="true", step_out=None, tag="job"):
        self.job_counter += 1
        work = os.path.join(self.work, f"baseline-{self.job_counter}-{tag}")
        os.mkdir(work, 0o700)
        guest = self.guest
        command = [os.path.join(HERE, "baseline-job.sh"), "--work", work,
                   "--disk", os.path.join(self.guest_dir, guest["disk"]),
                   "--disk-format", guest.get("disk_format") or "raw",
                   "--user", guest.get("user_default") or guest.get("user") or "runner",
                   "--memory", str(memory_mib or guest.get("memory_mib") or 512),
                   "--vcpus", str(guest.get("vcpus") or 1),
                   "--machine", guest.get("machine") or "pc", "--step", step]
        if upload:
            command += ["--upload", upload]
        if step_out:
            command += ["--step-out", step_out]
        out_path = os.path.join(work, "script.out")
        started_us = now_us()
        with open(out_path, "wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            LIVE.add(process)
            watch = ProcessWatch(process.pid)
            _, status, usage = os.wait4(process.pid, 0)
            LIVE.discard(process)
            ended_us = now_us()
            watch.finish(exited_pid_stat=False)
            process.returncode = os.waitstatus_to_exitcode(status)
        times = {}
        try:
            with open(os.path.join(work, "times.env")) as f:
                for line in f:
                    key, _, value = line.strip().partition("=")
                    times[key] = int(value)
        except OSError:
            pass
        argv = None
        try:
            with open(os.path.join(work, "qemu-argv"), "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0")[:-1]]
        except OSError:
            pass
        # Everything the script and its children used, minus QEMU's own share.
        all_cpu = usage.ru_utime + usage.ru_stime
        qemu_cpu = watch.qemu_cpu_s or 0.0
        if process.returncode != 0:
            with open(out_path, "rb") as f:
                tail = f.read()[-3000:].decode(errors="replace")
            raise RuntimeError(f"baseline job {work} failed with exit code "
                               f"{process.returncode}:\n{tail}")
        if not self.args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return {"kind": "baseline", "tag": tag, "wall_s": (ended_us - started_us) / 1e6,
                "times": times, "qemu_argv": argv, "own_cpu_s": max(all_cpu - qemu_cpu, 0.0),
                "qemu_cpu_s": qemu_cpu, "started_us": started_us, "ended_us": ended_us}

    # -- QEMU argv check

    @staticmethod
    def normalize_argv(argv):
        if not argv:
            return None
        out = []
        for arg in argv:
            arg = re.sub(r"(file|path)=[^,]*", r"\1=<path>", arg)
            out.append(arg)
        out[0] = os.path.basename(out[0])
        return out

    def check_argv(self, runner, baseline):
        r, b = self.normalize_argv(runner.get("qemu_argv")), self.normalize_argv(baseline.get("qemu_argv"))
        same = r is not None and r == b
        self.argv_checks.append({"same": same, "runner": r, "baseline": b})
        if not same:
            log(f"WARNING: QEMU argv differs:\n  runner:   {r}\n  baseline: {b}")


# ----------------------------------------------------------------------------- benchmarks


def alternate(pairs, first, second):
    """Runs `pairs` pairs, flipping which side goes first; returns ([first], [second])."""
    a, b = [], []
    for i in range(pairs):
        if i % 2 == 0:
            a.append(first(i))
            b.append(second(i))
        else:
            b.append(second(i))
            a.append(first(i))
    return a, b


def ratio(x, y):
    return x / y if x is not None and y not in (None, 0) else None


def bench_overhead(bench, pairs):
    log(f"job overhead: {pairs} pair(s) of a job whose only step is `true`")
    steps = [{"name": "noop", "script": "true"}]

    def runner(i):
        result = bench.runner_job(steps, tag="noop")
        log(f"  runner   #{i + 1}: {result['wall_s']:.2f} s")
        return result

    def baseline(i):
        result = bench.baseline_job(tag="noop")
        log(f"  baseline #{i + 1}: {result['wall_s']:.2f} s")
        return result

    runs, bases = alternate(pairs, runner, baseline)
    bench.check_argv(runs[0], bases[0])
    return runs, bases


def runner_phases(run):
    s = run["states"]
    return {
        "prepare": run["phases"].get("prepare"),
        "boot_to_ssh": run["phases"].get("boot_to_ssh"),
        "job_setup": (run["step_started_us"] - s["RUNNING"]) / 1000 if "RUNNING" in s else None,
        "step": run["phases"].get("step:noop", run["phases"].get("step:stream")),
        "shutdown": run["phases"].get("shutdown"),
    }


def baseline_phases(base):
    t = base["times"]
    return {
        "prepare": (t["prepared"] - t["start"]) / 1000,
        "boot_to_ssh": (t["ready"] - t["qemu_started"]) / 1000,
        "job_setup": 0.0,
        "step": (t["step_end"] - t["step_start"]) / 1000,
        "shutdown": (t["exited"] - t["powerdown"]) / 1000,
    }


def readiness_gaps(run):
    handoff = run["states"].get("CONSOLE_HANDOFF")
    watch = run.get("marker_watch_us")
    event = run.get("console_marker_us")
    return ((handoff - watch) / 1000 if handoff and watch else None,
            (handoff - event) / 1000 if handoff and event else None)


def bench_transfer(bench, pairs, stream_mib, upload_mib):
    log(f"output streaming ({stream_mib} MiB) and upload ({upload_mib} MiB): {pairs} pair(s)")
    payload = os.path.join(bench.work, "upload.bin")
    with open(payload, "wb") as f:
        for _ in range(upload_mib):
            f.write(os.urandom(MIB))
    stream_bytes = stream_mib * MIB
    step_script = f"head -c {stream_bytes} /dev/zero"
    remote = "/tmp/bench-upload.bin"

    def runner(i):
        out = os.path.join(bench.work, "runner-stream.out")
        result = bench.runner_job([{"name": "stream", "script": step_script}],
                                  uploads=[{"source": payload, "destination": remote}],
                                  memory_mib=TRANSFER_MEMORY_MIB, stream_to=out, tag="transfer")
        os.unlink(out)
        if result.get("terminal_zero_bytes") != stream_bytes or result["stdout_bytes"] != stream_bytes:
            raise RuntimeError(f"runner streamed {result.get('terminal_zero_bytes')} bytes to the "
                               f"terminal and logged {result['stdout_bytes']}, expected {stream_bytes}")
        log(f"  runner   #{i + 1}: {result['wall_s']:.2f} s")
        return result

    def baseline(i):
        out = os.path.join(bench.work, "baseline-stream.out")
        result = bench.baseline_job(memory_mib=TRANSFER_MEMORY_MIB, upload=f"{payload}:{remote}",
                                    step=step_script, step_out=out, tag="transfer")
        size = os.path.getsize(out)
        os.unlink(out)
        if size != stream_bytes:
            raise RuntimeError(f"baseline streamed {size} bytes, expected {stream_bytes}")
        log(f"  baseline #{i + 1}: {result['wall_s']:.2f} s")
        return result

    runs, bases = alternate(pairs, runner, baseline)
    os.unlink(payload)
    return runs, bases


def bench_scale(bench, pairs, levels):
    """N concurrent no-op jobs: one runner process running all N (one actor
    system), against N baseline scripts at once."""
    results = {}
    steps = [{"name": "noop", "script": "true"}]
    for n in levels:
        if n == 1:
            continue  # the overhead benchmark's single jobs are the N = 1 case
        log(f"scale: {n} concurrent no-op jobs, {pairs} pair(s)")

        def baseline_together():
            threads, out, errors = [], [None] * n, []

            def one(k):
                try:
                    out[k] = bench.baseline_job(tag=f"scale{n}")
                except Exception as e:  # reported after all have ended
                    errors.append(e)
            started = time.monotonic()
            for k in range(n):
                threads.append(threading.Thread(target=one, args=(k,)))
                threads[-1].start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return {"wall_s": time.monotonic() - started, "jobs": out}

        def runner(i):
            result = bench.runner_jobs_together(steps, n, tag=f"scale{n}")
            log(f"  runner   #{i + 1}: {result['wall_s']:.2f} s, one process, "
                f"peak RSS {result['hwm_kib'] / 1024:.1f} MiB")
            return result

        def baseline(i):
            result = baseline_together()
            log(f"  baseline #{i + 1}: {result['wall_s']:.2f} s")
            return result

        results[n] = alternate(pairs, runner, baseline)
    return results


# ----------------------------------------------------------------------------- report


def row(metric, unit, runner, baseline, ratio_value, target, met):
    return {"metric": metric, "unit": unit, "runner": runner, "baseline": baseline,
            "ratio": ratio_value, "target": target, "met": met}


def build_rows(overhead, transfer, scale, sizes):
    rows = []
    runs, bases = overhead
    # 1. job overhead
    wall_ratio = median([ratio(r["wall_s"], b["wall_s"]) for r, b in zip(runs, bases)])
    rows.append(row("job wall time (no-op job)", "s", median([r["wall_s"] for r in runs]),
                    median([b["wall_s"] for b in bases]), wall_ratio, "ratio <= 1.05",
                    wall_ratio is not None and wall_ratio <= 1.05))
    rp = [runner_phases(r) for r in runs]
    bp = [baseline_phases(b) for b in bases]
    for phase in ("prepare", "boot_to_ssh", "job_setup", "step", "shutdown"):
        rv = median([p[phase] for p in rp])
        bv = median([p[phase] for p in bp])
        pair_ratios = [ratio(p[phase], q[phase]) for p, q in zip(rp, bp)]
        rows.append(row(f"  phase {phase}", "ms", rv, bv, median(pair_ratios), "-", None))
    # 2. readiness
    watch_gaps = [readiness_gaps(r)[0] for r in runs]
    event_gaps = [readiness_gaps(r)[1] for r in runs]
    base_gaps = [(b["times"]["ready"] - b["times"]["marker"]) / 1000
                 if "marker" in b["times"] else None for b in bases]
    gap = median(watch_gaps)
    rows.append(row("ssh readiness gap (marker -> ready)", "ms", gap, median(base_gaps),
                    median([ratio(r, b) for r, b in zip(watch_gaps, base_gaps)]),
                    "runner <= 50 ms", gap is not None and gap <= 50))
    rows.append(row("  gap from the runner's own console event", "ms", median(event_gaps), None,
                    None, "-", None))
    # 3 and 4. transfer
    truns, tbases = transfer
    stream_bytes = sizes["stream_mib"] * MIB
    upload_bytes = sizes["upload_mib"] * MIB
    setup_ms = median([p["job_setup"] for p in rp])

    def stream_rate_runner(r):
        return stream_bytes / MIB / ((r["arrival_step_end_us"] - r["arrival_step_start_us"]) / 1e6)

    def stream_rate_runner_events(r):
        return stream_bytes / MIB / ((r["step_finished_us"] - r["step_started_us"]) / 1e6)

    def stream_rate_baseline(b):
        t = b["times"]
        return stream_bytes / MIB / ((t["step_end"] - t["step_start"]) / 1e6)

    def upload_rate_runner(r):
        # Time from RUNNING to the step's start, less that of a job without uploads
        # (directory set-up, environment and script uploads).
        spent_ms = (r["step_started_us"] - r["states"]["RUNNING"]) / 1000 - setup_ms
        return upload_bytes / MIB / (max(spent_ms, 1.0) / 1000)

    def upload_rate_baseline(b):
        t = b["times"]
        return upload_bytes / MIB / ((t["upload_end"] - t["upload_start"]) / 1e6)

    for name, fr, fb, target in (
            (f"output streaming {sizes['stream_mib']} MiB (terminal)", stream_rate_runner,
             stream_rate_baseline, 0.9),
            (f"  streaming, runner's own step events", stream_rate_runner_events,
             stream_rate_baseline, None),
            (f"upload {sizes['upload_mib']} MiB (SFTP)", upload_rate_runner,
             upload_rate_baseline, 0.9)):
        rv = [fr(r) for r in truns]
        bv = [fb(b) for b in tbases]
        pair_ratio = median([ratio(x, y) for x, y in zip(rv, bv)])
        rows.append(row(name, "MiB/s", median(rv), median(bv), pair_ratio,
                        f"ratio >= {target}" if target else "-",
                        (pair_ratio is not None and pair_ratio >= target) if target else None))
    # 5. scale: the runner side is one process running all N jobs
    levels = sorted([1] + list(scale.keys()))
    hwm = {}
    for n in levels:
        if n == 1:
            rsets = [{"n": 1, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "hwm_kib": r["hwm_kib"]}
                     for r in runs]
            bsets = [{"wall_s": b["wall_s"], "jobs": [b]} for b in bases]
        else:
            rsets, bsets = scale[n]
        wall_r = median([s["wall_s"] for s in rsets])
        wall_b = median([s["wall_s"] for s in bsets])
        rows.append(row(f"scale {n} concurrent: total wall time", "s", wall_r, wall_b,
                        median([ratio(r["wall_s"], b["wall_s"]) for r, b in zip(rsets, bsets)]),
                        "-", None))
        # The process's CPU shared out over its jobs, against the wall time they ran in.
        cpu_share = median([100.0 * s["cpu_s"] / s["n"] / s["wall_s"] for s in rsets])
        base_share = median([100.0 * j["own_cpu_s"] / j["wall_s"] for s in bsets for j in s["jobs"]])
        rows.append(row(f"scale {n}: CPU per job, % of job wall time", "%", cpu_share, base_share,
                        ratio(cpu_share, base_share), "runner <= 2 %",
                        cpu_share is not None and cpu_share <= 2.0))
        rows.append(row(f"scale {n}: runner CPU per job", "s",
                        median([s["cpu_s"] / s["n"] for s in rsets]),
                        median([j["own_cpu_s"] for s in bsets for j in s["jobs"]]), None, "-", None))
        hwm[n] = median([s["hwm_kib"] / 1024 for s in rsets])
        rows.append(row(f"scale {n}: peak RSS, the one runner process", "MiB", hwm[n], None, None,
                        "-", None))
    top = levels[-1]
    if top > 1:
        per_extra = (hwm[top] - hwm[1]) / (top - 1)
        rows.append(row(f"RSS per extra concurrent job (1 -> {top})", "MiB", per_extra, None, None,
                        "<= 4 MiB", per_extra <= 4.0))
    return rows


def fmt(value, unit=""):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if unit == "ms" or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def print_table(rows):
    header = ("metric", "unit", "runner", "baseline", "ratio", "target", "met?")
    lines = [header] + [(r["metric"], r["unit"], fmt(r["runner"], r["unit"]),
                         fmt(r["baseline"], r["unit"]), fmt(r["ratio"]), r["target"],
                         "" if r["met"] is None else fmt(r["met"])) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for k, line in enumerate(lines):
        print("  ".join(cell.ljust(widths[i]) if i in (0, 1, 5) else cell.rjust(widths[i])
                        for i, cell in enumerate(line)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def machine_info():
    info = {"cpus": os.cpu_count(), "accel": "tcg", "kernel": platform.release(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        info["load_average_at_start"] = os.getloadavg()
        qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
        info["qemu"] = qemu.stdout.splitlines()[0] if qemu.stdout else None
        ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
        info["openssh"] = ssh.stderr.strip()
    except OSError:
        pass
    return info


def strip_raw(results):
    """Raw results without the bulky QEMU argv (kept once in argv_check)."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "qemu_argv"}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return clean(results)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--pairs", type=int, default=None,
                        help="pairs per benchmark (default: 1 tiny, 5 full)")
    parser.add_argument("--scale-pairs", type=int, default=None,
                        help="pairs per concurrency level of the scale test (default: --pairs)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the results here")
    parser.add_argument("--runner", required=True)
    parser.add_argument("--guest-dir", required=True)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and job records")
    parser.add_argument("--check", action="store_true",
                        help="fail unless every measured metric has a value (smoke test)")
    args = parser.parse_args()
    sizes = SIZES[args.size]
    pairs = args.pairs or sizes["pairs"]
    scale_pairs = args.scale_pairs or pairs
    if pairs < 1 or scale_pairs < 1:
        parser.error("--pairs and --scale-pairs must be at least 1")

    bench = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    info = machine_info()
    log(f"size {args.size}, {pairs} pair(s), work dir {bench.work}; load average "
        f"{info.get('load_average_at_start')}")
    try:
        overhead = bench_overhead(bench, pairs)
        transfer = bench_transfer(bench, pairs, sizes["stream_mib"], sizes["upload_mib"])
        scale = bench_scale(bench, scale_pairs, sizes["scale"])
    finally:
        end_live_children()
        bench.cleanup()
    info["load_average_at_end"] = os.getloadavg()
    rows = build_rows(overhead, transfer, scale, sizes)
    print()
    print(f"Solstice Runner vs QEMU + OpenSSH: size {args.size}, {pairs} pair(s) "
          f"(scale: {scale_pairs}), medians; {info['cpus']} CPUs, TCG, load "
          f"{info['load_average_at_start'][0]:.1f} -> {info['load_average_at_end'][0]:.1f}")
    print()
    print_table(rows)
    argv_same = all(c["same"] for c in bench.argv_checks)
    print(f"\nQEMU argv of runner and baseline identical (paths aside): {'yes' if argv_same else 'NO'}")
    if args.json_out:
        document = {"size": args.size, "pairs": pairs, "scale_pairs": scale_pairs,
                    "sizes": sizes, "machine": info, "duration_s": time.time() - started,
                    "argv_check": bench.argv_checks[:1], "rows": rows,
                    "raw": strip_raw({"overhead": overhead, "transfer": transfer,
                                      "scale": {str(k): v for k, v in scale.items()}})}
        with open(args.json_out, "w") as f:
            json.dump(document, f, indent=1)
        log(f"results written to {args.json_out}")
    if not argv_same:
        return 1
    if args.check:
        missing = missing_values(rows)
        if missing:
            print("bench: no value for: " + "; ".join(missing), file=sys.stderr)
            return 1
    return 0


def missing_values(rows):
    """Metrics with a target whose runner value (and baseline value, where the
    baseline measures the same thing) is missing or not a positive number."""
    missing = []
    for r in rows:
        if r["target"] == "-":
            continue
        values = [("runner", r["runner"])]
        if not r["metric"].startswith("RSS per extra"):
            values.append(("baseline", r["baseline"]))
        for side, value in values:
            if not isinstance(value, (int, float)) or value != value or value < 0:
                missing.append(f"{r['metric']} ({side})")
    return missing


if __name__ == "__main__":
    sys.exit(main())
