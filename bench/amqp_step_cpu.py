#!/usr/bin/env python3
"""Where the CPU goes while a step streams 16 MiB, through the broker and locally.

Starts its own rabbitmq-server and one `node --amqp` (as bench/amqp_overhead.py
does), then alternates the stream job through `submit --amqp` and `run`. While
each job runs it samples every 50 ms the CPU time (utime+stime) of every
process involved; from the job's step_started and step_finished events it
reports, for the step alone: its duration and the CPU taken by QEMU, by the
runner itself (the node or the local `run`), by the submitter and by the broker.
On a shared 2-core machine every CPU second outside QEMU is partly taken from
the guest, so this says what the AMQP path costs beside the local run.

    bench/amqp_step_cpu.py --runner build/solstice-runner --guest-dir build/test-guest \\
        [--pairs 2] [--json OUT]
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from amqp_overhead import Broker, log  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
SCRIPT = "head -c 16777216 /dev/zero"


def cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / HZ
    except (OSError, IndexError, ValueError):
        return None


def tree(pid):
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    pids += tree(int(child))
    except OSError:
        pass
    return pids


def role_of(pid, side, root):
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        comm = "?"
    if "qemu" in comm:
        return "qemu"
    if side == "broker":
        return "broker"
    if pid == root:
        return {"node": "runner", "client": "submitter"}[side]
    return None  # qemu-img and the like: not part of the step


def step_window(state_dir, job_id):
    times = {}
    with open(os.path.join(state_dir, "jobs", job_id, "events.jsonl")) as f:
        for line in f:
            event = json.loads(line)
            for kind in ("step_started", "step_finished"):
                if kind in event and kind not in times:
                    times[kind] = int(event["timestamp_us"]) / 1e6
    return times["step_started"], times["step_finished"]


def flow_notes(log_path, job_id, side):
    """What the runner said about the job's flow control: the node's line
    "job ID answered: ..." (events, messages, confirm window, output held back)
    and, at --log-level debug, how often the step's output waited for credit
    (the last such line in the log is this job's: one job runs at a time)."""
    notes = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            if side == "amqp" and line.startswith(f"job {job_id} answered:"):
                notes["node_flow"] = line.strip()
            if "its output waited for credit" in line and "step 0:" in line:
                notes["credit_waits"] = line.strip().split("step 0: ", 1)[1]
    return notes


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", required=True)
    parser.add_argument("--guest-dir", required=True)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--log-level", default="info",
                        help="the runner's --log-level; at debug each row also says how often "
                             "the step's output waited for its sinks' credit")
    args = parser.parse_args()
    runner = os.path.abspath(args.runner)
    env = dict(os.environ, SOLSTICE_TEST_GUEST_DIR=os.path.abspath(args.guest_dir))
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="solstice-amqp-cpu-")
    os.chmod(work, 0o711)
    broker = Broker(work)
    node, raw = None, []
    try:
        node_log = os.path.join(work, "node.out")
        node = subprocess.Popen([runner, "node", "--name", "bench", "--slots", "1", "--memory-mib",
                                 "4096", "--state-dir", os.path.join(work, "node-state"),
                                 "--accel", "tcg", "--amqp", broker.url, "--amqp-password-file",
                                 broker.password_file, "--log-level", args.log_level],
                                stdout=open(node_log, "wb"),
                                stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while b"takes jobs from queue" not in open(node_log, "rb").read():
            if time.time() > deadline or node.poll() is not None:
                raise RuntimeError("the node did not start")
            time.sleep(0.2)
        for pair in range(args.pairs):
            for side in (["amqp", "local"] if pair % 2 == 0 else ["local", "amqp"]):
                job_id = f"amqp-cpu-{os.getpid()}-{pair}-{side}"
                job_file = os.path.join(work, job_id + ".json")
                with open(job_file, "w") as f:
                    json.dump({"id": job_id, "runs_on": "solstice-test-guest",
                               "steps": [{"name": "stream", "script": SCRIPT}]}, f)
                if side == "amqp":
                    command = [runner, "submit", "--amqp", broker.url, "--amqp-password-file",
                               broker.password_file, job_file]
                    state = os.path.join(work, "node-state")
                else:
                    command = [runner, "run", job_file, "--state-dir",
                               os.path.join(work, "local-state"), "--accel", "tcg",
                               "--log-level", args.log_level]
                    state = os.path.join(work, "local-state")
                client = subprocess.Popen(command, stdout=open(os.path.join(work, job_id + ".out"),
                                                               "wb"),
                                          stderr=subprocess.STDOUT, env=env)
                samples = []  # (time, {(pid, role): cpu s})
                while client.poll() is None:
                    snapshot = {}
                    for kind, root in (("broker", broker.server.pid), ("node", node.pid),
                                       ("client", client.pid)):
                        for pid in tree(root):
                            role, used = role_of(pid, kind, root), cpu_s(pid)
                            if role and used is not None:
                                snapshot[(pid, role)] = used
                    samples.append((time.time(), snapshot))
                    time.sleep(0.05)
                if client.returncode != 0:
                    raise RuntimeError(f"{side} job failed (see {work})")
                started, finished = step_window(state, job_id)
                first = min(samples, key=lambda s: abs(s[0] - started))[1]
                last = min(samples, key=lambda s: abs(s[0] - finished))[1]
                used = {}
                for key, value in last.items():
                    if key in first:
                        used[key[1]] = used.get(key[1], 0.0) + value - first[key]
                if side == "local":  # the local `run` is runner and printer in one
                    used["runner"] = used.pop("submitter", 0.0)
                row = {"pair": pair + 1, "side": side, "step_s": finished - started,
                       "cpu_s": {k: round(v, 3) for k, v in sorted(used.items())},
                       "load_average": os.getloadavg()[0]}
                log_path = node_log if side == "amqp" else os.path.join(work, job_id + ".out")
                notes = flow_notes(log_path, job_id, side)
                if side == "amqp" and "node_flow" not in notes:
                    time.sleep(1)  # the node says it once the broker confirmed the result
                    notes = flow_notes(log_path, job_id, side)
                row.update(notes)
                raw.append(row)
                log(f"pair {pair + 1} {side}: step {row['step_s']:.2f} s, CPU {row['cpu_s']}")
    finally:
        if node and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        broker.stop()
        subprocess.call(["rm", "-rf", work])
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"script": SCRIPT, "pairs": args.pairs, "raw": raw,
                       "cpus": os.cpu_count(), "load_average_at_start": load_start,
                       "load_average_at_end": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
