#!/usr/bin/env python3
"""Restored jobs against cold boots, measured side by side in one run (BENCHMARKS.md,
"Restored jobs"). Every job is `solstice-runner run` of a job whose one step prints a
marker, on the built test guest, TCG:

  template build   `template build` on an empty state dir (wall time and the build_ms
                   the template records), --builds times
  job wall time    cold (`run --cold`) and restored (`run`, template ready) alternate,
                   pair after pair, which goes first flipping each pair; ratio = the
                   median of the per-pair ratios restored / cold
  first byte       from spawning `run` to the marker's first byte on its stdout, p50
                   over --jobs restored jobs (and the cold ones of the pairs)
  8 at once        one `run` of 8 restored jobs (max_concurrent_vms 8): p50 of each
                   job's spawn -> first byte, against the single-job p50; each QEMU's
                   peak RSS, PSS and anonymous memory (smaps_rollup, every 0.1 s)
  baseline         with --baseline-runner, a second runner (e.g. the one before a
                   change) builds its own template and its restored jobs alternate
                   with this runner's, one for one, so both meet the same load; its
                   first byte p50 and phases are reported beside this runner's, and
                   the median of the pairs' differences (this minus the baseline);
                   its N-at-once runs alternate with this runner's too
  rounds           --concurrent-rounds R: the N-at-once run R times (p50 over all
                   of them), so that one unlucky run on a noisy machine says less

  bench/restore.py --runner build/solstice-runner --guest-dir build/test-guest \
                   [--pairs 5 (0: no cold jobs)] [--jobs 10] [--builds 2] [--concurrent 8 (0: skip)]
                   [--concurrent-rounds 1] [--baseline-runner OTHER] [--json OUT]
"""
import argparse
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import resource
import tempfile
import threading
import time

MARKER = "solstice-bench-first-byte"


def now():
    return time.monotonic()


def children_cpu_s():
    """CPU seconds of every waited-for descendant so far: the runner and the QEMUs it reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def qemu_memory(root_pid):
    """{pid: (rss MiB, pss MiB, anonymous MiB)} of the QEMUs under `root_pid` (smaps_rollup)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(entry)] = int(fields[1])
            except OSError:
                pass
    found = {}
    for pid in parent:
        up = pid
        while up in parent and up != root_pid and up > 1:
            up = parent[up]
        if up != root_pid or pid == root_pid:
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("qemu-system"):
                    continue
            values = {}
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0].endswith(":"):
                        values[parts[0][:-1]] = int(parts[1]) / 1024
            found[pid] = (values.get("Rss", 0), values.get("Pss", 0), values.get("Anonymous", 0))
        except OSError:
            pass
    return found


def sample_memory(root_pid, peaks, stop):
    """Keeps each QEMU's peak (rss, pss, anonymous) in `peaks` until `stop` is set."""
    while not stop.is_set():
        for pid, values in qemu_memory(root_pid).items():
            old = peaks.get(pid, (0, 0, 0))
            peaks[pid] = tuple(max(a, b) for a, b in zip(old, values))
        stop.wait(0.1)


def run_jobs(runner, env, state, work, ids, cold, config=None, cpu=None, memory=None):
    """Runs one `run` process for the jobs `ids`; returns (wall s, {id: first byte s}, out).
    `cpu` (a dict), when given, gets the run's CPU seconds (runner and QEMUs) as "cpu_s";
    `memory` (a dict), each QEMU's peak memory as "qemu_peak_mib": [[rss, pss, anonymous]]."""
    files = []
    for job_id in ids:
        path = os.path.join(work, job_id + ".json")
        with open(path, "w") as f:
            json.dump({"id": job_id, "runs_on": "solstice-test-guest",
                       "steps": [{"name": "marker", "script": f"echo {MARKER}-{job_id}"}]}, f)
        files.append(path)
    command = [runner, "run", *files, "--state-dir", state, "--accel", "tcg"]
    if cold:
        command.append("--cold")
    if config:
        command += ["--config", config]
    started = now()
    cpu_before = children_cpu_s()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peaks, stop = {}, threading.Event()
    sampler = None
    if memory is not None:
        sampler = threading.Thread(target=sample_memory, args=(process.pid, peaks, stop))
        sampler.start()
    first = {}
    out = b""
    while True:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            for job_id in ids:
                if job_id not in first and f"{MARKER}-{job_id}".encode() in out:
                    first[job_id] = now() - started
    code = process.wait()
    wall = now() - started
    if sampler:
        stop.set()
        sampler.join()
        memory["qemu_peak_mib"] = [list(v) for v in peaks.values()]
    if cpu is not None:
        cpu["cpu_s"] = children_cpu_s() - cpu_before
    if code != 0 or len(first) != len(ids):
        sys.exit(f"restore.py: run failed (exit {code}):\n{out.decode(errors='replace')}")
    return wall, first, out.decode(errors="replace")


def result_of(state, job_id):
    with open(os.path.join(state, "jobs", job_id, "result.json")) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runner", required=True)
    parser.add_argument("--guest-dir", required=True)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--builds", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--concurrent-rounds", type=int, default=1)
    parser.add_argument("--vm-memory-mib", type=int, default=512,
                        help="the guest's memory, for the memory rows' ratio (512: the cloud guest)")
    parser.add_argument("--baseline-runner")
    parser.add_argument("--json")
    args = parser.parse_args()
    env = dict(os.environ, SOLSTICE_TEST_GUEST_DIR=os.path.abspath(args.guest_dir))
    work = tempfile.mkdtemp(prefix="solstice-bench-restore-")
    os.chmod(work, 0o711)  # QEMU's own user (a root runner's) reaches the state dirs in it
    raw = {"machine": {"cpus": os.cpu_count(), "accel": "tcg", "kernel": platform.release(),
                       "load_average_at_start": os.getloadavg(),
                       "qemu": subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                              text=True).stdout.splitlines()[0]}}
    started = now()
    try:
        # Template builds, each on an empty state dir.
        builds = []
        for i in range(args.builds):
            state = os.path.join(work, f"build-{i}")
            t0 = now()
            done = subprocess.run([args.runner, "template", "build", "--state-dir", state, "--accel", "tcg"],
                                  env=env, capture_output=True, text=True)
            wall = now() - t0
            if done.returncode != 0:
                sys.exit("restore.py: template build failed:\n" + done.stderr)
            listed = json.loads(subprocess.run([args.runner, "template", "list", "--json", "--state-dir", state],
                                               env=env, capture_output=True, text=True).stdout.splitlines()[0])
            builds.append({"wall_s": wall, "build_ms": listed["build_ms"], "state_bytes": listed["state_bytes"]})
            if i + 1 < args.builds:
                shutil.rmtree(state)
        state = os.path.join(work, f"build-{args.builds - 1}")  # has the template now
        baseline_state = None
        if args.baseline_runner:
            baseline_state = os.path.join(work, "baseline")
            done = subprocess.run([args.baseline_runner, "template", "build", "--state-dir", baseline_state,
                                   "--accel", "tcg"], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit("restore.py: the baseline's template build failed:\n" + done.stderr)

        # Cold and restored jobs alternate.
        pairs = []
        for i in range(args.pairs):
            order = ["cold", "restored"] if i % 2 == 0 else ["restored", "cold"]
            pair = {}
            for kind in order:
                job_id = f"{kind}-{i}"
                wall, first, _ = run_jobs(args.runner, env, state, work, [job_id], kind == "cold")
                start = result_of(state, job_id).get("start")
                if start != kind:
                    sys.exit(f"restore.py: job {job_id} started {start}, not {kind}")
                pair[kind] = {"wall_s": wall, "first_byte_s": first[job_id]}
            pairs.append(pair)

        # Restored jobs one at a time: spawn -> first byte of step output (the
        # baseline's, if any, alternating with them).
        def single(runner, where, job_id):
            cpu = {}
            wall, first, _ = run_jobs(runner, env, where, work, [job_id], False, cpu=cpu)
            phases = {p["phase"]: int(p["duration_ms"]) / 1000
                      for p in result_of(where, job_id).get("phases", [])}
            return {"wall_s": wall, "first_byte_s": first[job_id], "phases_s": phases, **cpu}

        singles, baseline_singles = [], []
        for i in range(args.jobs):
            order = [False, True] if i % 2 == 0 else [True, False]
            for is_baseline in order if baseline_state else [False]:
                if is_baseline:
                    baseline_singles.append(single(args.baseline_runner, baseline_state, f"baseline-{i}"))
                else:
                    singles.append(single(args.runner, state, f"single-{i}"))

        # N restored jobs at once, in one process (--concurrent 0: not measured),
        # --concurrent-rounds times, alternating with the baseline's when there is one.
        def at_once(runner, where, round_index, prefix):
            config = os.path.join(work, "config.json")
            with open(config, "w") as f:
                json.dump({"max_concurrent_vms": args.concurrent}, f)
            ids = [f"{prefix}-{round_index}-{i}" for i in range(args.concurrent)]
            cpu, memory = {}, {}
            wall, first, _ = run_jobs(runner, env, where, work, ids, False, config, cpu=cpu,
                                      memory=memory)
            for job_id in ids:
                if result_of(where, job_id).get("start") != "restored":
                    sys.exit(f"restore.py: {job_id} was not restored")
            return {"wall_s": wall, "first_byte_s": [first[j] for j in ids], **cpu, **memory}

        many_rounds, baseline_many_rounds = [], []
        if args.concurrent > 0:
            for r in range(args.concurrent_rounds):
                order = [False, True] if r % 2 == 0 else [True, False]
                for is_baseline in order if baseline_state else [False]:
                    if is_baseline:
                        baseline_many_rounds.append(at_once(args.baseline_runner, baseline_state, r, "base-many"))
                    else:
                        many_rounds.append(at_once(args.runner, state, r, "many"))
        many = many_rounds[0] if many_rounds else None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    single_p50 = med([s["first_byte_s"] for s in singles])
    many_p50 = med([t for m in many_rounds for t in m["first_byte_s"]]) if many else None
    rows = [
        ("template build (wall, `template build`)", "s", med([b["wall_s"] for b in builds]), None, "-"),
        ("template build (recorded build_ms)", "s", med([b["build_ms"] / 1000 for b in builds]), None, "-"),
        ("template state file", "MiB", med([b["state_bytes"] / 2**20 for b in builds]), None, "-"),
    ]
    if pairs:
        ratio = med([p["restored"]["wall_s"] / p["cold"]["wall_s"] for p in pairs])
        rows += [
            ("job wall time, cold (no-op step)", "s", med([p["cold"]["wall_s"] for p in pairs]), None, "-"),
            ("job wall time, restored", "s", med([p["restored"]["wall_s"] for p in pairs]), ratio,
             "ratio <= 0.25"),
            ("run -> first byte of step output, cold", "s", med([p["cold"]["first_byte_s"] for p in pairs]),
             None, "-"),
        ]
    rows.append((f"run -> first byte, restored, p50 of {args.jobs}", "s", single_p50, None, "-"))
    single_cpu = med([s["cpu_s"] for s in singles])
    rows.append(("CPU of one restored job (runner + QEMU), p50", "s", single_cpu,
                 single_cpu / med([s["wall_s"] for s in singles]), "- (ratio: of its wall)"))
    if baseline_singles:
        baseline_p50 = med([s["first_byte_s"] for s in baseline_singles])
        rows.append((f"baseline runner: first byte, restored, p50 of {args.jobs}", "s", baseline_p50,
                     single_p50 / baseline_p50, "-"))
        rows.append(("first byte, this minus the baseline, median of pairs", "s",
                     med([a["first_byte_s"] - b["first_byte_s"] for a, b in zip(singles, baseline_singles)]),
                     None, "-"))
        rows.append(("CPU of a job, this minus the baseline, median of pairs", "s",
                     med([a["cpu_s"] - b["cpu_s"] for a, b in zip(singles, baseline_singles)]), None, "-"))
        for name in sorted({n for s in singles + baseline_singles for n in s["phases_s"]}):
            if name.startswith("step:") or name in ("prepare", "console_handoff", "shutdown"):
                continue
            for label, runs in (("", singles), ("baseline ", baseline_singles)):
                values = [s["phases_s"].get(name, 0.0) for s in runs]
                rows.append((f"{label}phase {name}, p50", "s", med(values), None, "-"))
    if many:
        rows += [
            (f"{args.concurrent} restored at once: first byte p50 ({len(many_rounds)} run(s))", "s", many_p50,
             many_p50 / single_p50, "ratio <= 2"),
            (f"{args.concurrent} restored at once: total wall time, p50", "s",
             med([m["wall_s"] for m in many_rounds]), None, "-"),
            # The jobs share the cores: their first bytes cannot come before the CPU they
            # need has been given, on average half of it for the median job.
            (f"{args.concurrent} restored at once: CPU (runner + QEMUs)", "s", many["cpu_s"],
             many["cpu_s"] / (args.concurrent * single_cpu), f"- (ratio: of {args.concurrent} single jobs' CPU)"),
            (f"  CPU / {os.cpu_count()} cores (the wall a full machine needs)", "s",
             many["cpu_s"] / os.cpu_count(), many["cpu_s"] / os.cpu_count() / single_p50,
             "- (ratio: of one job's first byte)"),
        ]
        if baseline_many_rounds:
            baseline_many_p50 = med([t for m in baseline_many_rounds for t in m["first_byte_s"]])
            rows.append((f"baseline: {args.concurrent} at once, first byte p50 ({len(baseline_many_rounds)} run(s))",
                         "s", baseline_many_p50, baseline_many_p50 / med([s["first_byte_s"] for s in baseline_singles]),
                         "- (ratio: of the baseline's single job)"))
            rows.append((f"baseline: {args.concurrent} at once, total wall time, p50", "s",
                         med([m["wall_s"] for m in baseline_many_rounds]), None, "-"))
        peaks = many.get("qemu_peak_mib") or []
        if peaks:
            memory_mib = args.vm_memory_mib
            for index, what in ((0, "RSS"), (1, "PSS"), (2, "anonymous")):
                top = max(p[index] for p in peaks)
                rows.append((f"{args.concurrent} at once: one QEMU's peak {what}, largest", "MiB", top,
                             top / memory_mib, f"- (ratio: of the VM's {memory_mib} MiB)"))
    print(f"{'metric':52} {'unit':5} {'value':>8} {'ratio':>6}  target")
    for name, unit, value, r, target in rows:
        print(f"{name:52} {unit:5} {value:8.2f} {'' if r is None else f'{r:6.3f}':>6}  {target}")
    raw.update({"duration_s": now() - started, "pairs": pairs, "singles": singles, "many": many,
                "many_rounds": many_rounds, "baseline_many_rounds": baseline_many_rounds,
                "builds": builds, "baseline_runner": args.baseline_runner,
                "baseline_singles": baseline_singles,
                "rows": [{"metric": n, "unit": u, "value": v, "ratio": r, "target": t}
                         for n, u, v, r, t in rows]})
    raw["machine"]["load_average_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    main()
