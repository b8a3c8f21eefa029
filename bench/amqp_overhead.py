#!/usr/bin/env python3
"""The AMQP path against a local `run` of the same job, alternating, in one run.

Starts its own rabbitmq-server (own epmd, data dir and free ports on 127.0.0.1,
stopped by PID) and one `solstice-runner node --amqp` (1 slot). Then, pair after
pair (which side goes first flips every pair), the same job runs once through
`solstice-runner run` and once through `solstice-runner submit --amqp` (published,
taken by the node, events and result back over the broker). Reported per job:
each side's median wall time and the median of the per-pair wall ratios (AMQP /
local); and, because a TCG boot on a shared machine varies by seconds from one
job to the next, two measures that leave the VM's own variance out: the time each
side spends outside the job's own span (result started_at..ended_at: process
start, publishing, queueing, following, exit), and the ratio of the step's own
duration (the `step:NAME` phase: streaming through the node and the broker, with
their flow control, against the local terminal). Jobs: a single `true` step (the
fixed overhead) and a step streaming 16 MiB (the events path under load).

    bench/amqp_overhead.py --runner build/solstice-runner --guest-dir build/test-guest \\
        [--pairs 3] [--json OUT]
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

JOBS = {
    "noop": [{"name": "noop", "script": "true"}],
    "stream-16MiB": [{"name": "stream", "script": "head -c 16777216 /dev/zero"}],
}


def log(message):
    print(f"[amqp-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """rabbitmq-server in `work`, as the AMQP tests start it."""

    def __init__(self, work):
        self.dir = os.path.join(work, "broker")
        for sub in ("home", "mnesia", "log"):
            os.makedirs(os.path.join(self.dir, sub))
        self.port, dist, epmd = free_port(), free_port(), free_port()
        node = f"solstice-bench-{os.getpid()}@localhost"
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{self.port}\nloopback_users = none\n")
        with open(os.path.join(self.dir, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        self.password_file = os.path.join(self.dir, "password")
        with open(self.password_file, "w") as f:
            f.write("guest\n")
        d = self.dir
        env = dict(os.environ, HOME=f"{d}/home", ERL_EPMD_PORT=str(epmd), RABBITMQ_NODENAME=node,
                   RABBITMQ_NODE_IP_ADDRESS="127.0.0.1", RABBITMQ_NODE_PORT=str(self.port),
                   RABBITMQ_DIST_PORT=str(dist), RABBITMQ_MNESIA_BASE=f"{d}/mnesia",
                   RABBITMQ_LOG_BASE=f"{d}/log", RABBITMQ_CONFIG_FILE=f"{d}/rabbitmq.conf",
                   RABBITMQ_ADVANCED_CONFIG_FILE=f"{d}/advanced.config",
                   RABBITMQ_ENABLED_PLUGINS_FILE=f"{d}/enabled_plugins",
                   RABBITMQ_CONF_ENV_FILE=f"{d}/rabbitmq-env.conf", RABBITMQ_ALLOW_INPUT="true",
                   RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-noinput -start_epmd false "
                   "-kernel inet_dist_use_interface {127,0,0,1}")
        self.epmd = subprocess.Popen(["/usr/bin/epmd", "-port", str(epmd), "-address", "127.0.0.1"],
                                     env=env)
        time.sleep(0.3)
        self.log_path = os.path.join(self.dir, "server.out")
        self.out = open(self.log_path, "wb")
        self.server = subprocess.Popen(["/usr/lib/rabbitmq/bin/rabbitmq-server"], env=env,
                                       stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline:
            with open(self.log_path, "rb") as f:
                if b"Starting broker... completed" in f.read():
                    return
            if self.server.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("rabbitmq-server did not start (see " + self.log_path + ")")

    @property
    def url(self):
        return f"amqp://guest@127.0.0.1:{self.port}"

    def stop(self):
        for process in (self.server, self.epmd):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def job_times(state_dir, job_id):
    """The job's own span (s) and its step's duration (s) from its record."""
    with open(os.path.join(state_dir, "jobs", job_id, "result.json")) as f:
        result = json.load(f)
    span = (int(result["ended_at_us"]) - int(result["started_at_us"])) / 1e6
    step = next((int(p["duration_ms"]) / 1e3 for p in result.get("phases", [])
                 if p["phase"].startswith("step:")), None)
    return span, step


def timed(command, env, out_path):
    started = time.monotonic()
    with open(out_path, "wb") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    wall = time.monotonic() - started
    if code != 0:
        with open(out_path, "rb") as f:
            tail = f.read()[-2000:].decode(errors="replace")
        raise RuntimeError(f"{command[1]} failed with exit code {code}:\n{tail}")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", required=True)
    parser.add_argument("--guest-dir", required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    runner = os.path.abspath(args.runner)
    env = dict(os.environ, SOLSTICE_TEST_GUEST_DIR=os.path.abspath(args.guest_dir))
    work = tempfile.mkdtemp(prefix="solstice-amqp-bench-")
    os.chmod(work, 0o711)
    load_start = os.getloadavg()
    broker = Broker(work)
    node = None
    raw = []
    try:
        node_out = open(os.path.join(work, "node.out"), "wb")
        node = subprocess.Popen([runner, "node", "--name", "bench", "--slots", "1", "--memory-mib",
                                 "4096", "--state-dir", os.path.join(work, "node-state"),
                                 "--accel", "tcg", "--amqp", broker.url, "--amqp-password-file",
                                 broker.password_file], stdout=node_out,
                                stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 60
        while b"takes jobs from queue" not in open(os.path.join(work, "node.out"), "rb").read():
            if time.time() > deadline or node.poll() is not None:
                raise RuntimeError("the node did not start")
            time.sleep(0.2)
        counter = 0
        for pair in range(args.pairs):
            for kind, steps in JOBS.items():
                walls, spans, steps_s = {}, {}, {}
                order = ["local", "amqp"] if pair % 2 == 0 else ["amqp", "local"]
                for side in order:
                    counter += 1
                    job_id = f"amqp-bench-{os.getpid()}-{counter}"
                    job_file = os.path.join(work, f"{job_id}.json")
                    with open(job_file, "w") as f:
                        json.dump({"id": job_id, "name": kind, "runs_on": "solstice-test-guest",
                                   "steps": steps}, f)
                    if side == "local":
                        command = [runner, "run", job_file, "--state-dir",
                                   os.path.join(work, "local-state"), "--accel", "tcg"]
                    else:
                        command = [runner, "submit", "--amqp", broker.url,
                                   "--amqp-password-file", broker.password_file, job_file]
                    walls[side] = timed(command, env, os.path.join(work, f"{job_id}.out"))
                    state = os.path.join(work, "local-state" if side == "local" else "node-state")
                    spans[side], steps_s[side] = job_times(state, job_id)
                    log(f"pair {pair + 1} {kind} {side}: {walls[side]:.2f} s "
                        f"(job span {spans[side]:.2f} s)")
                raw.append({"pair": pair + 1, "job": kind, "order": order,
                            "local_wall_s": walls["local"], "amqp_wall_s": walls["amqp"],
                            "ratio": walls["amqp"] / walls["local"],
                            "local_span_s": spans["local"], "amqp_span_s": spans["amqp"],
                            "local_outside_s": walls["local"] - spans["local"],
                            "amqp_outside_s": walls["amqp"] - spans["amqp"],
                            "local_step_s": steps_s["local"], "amqp_step_s": steps_s["amqp"]})
    finally:
        if node and node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for kind in JOBS:
        pairs = [r for r in raw if r["job"] == kind]
        med = lambda key: statistics.median(r[key] for r in pairs)
        row = {"job": kind, "local_median_s": med("local_wall_s"),
               "amqp_median_s": med("amqp_wall_s"), "ratio_median": med("ratio"),
               "local_outside_median_s": med("local_outside_s"),
               "amqp_outside_median_s": med("amqp_outside_s"),
               # The wall ratio with both sides given the same job span: what the
               # AMQP path adds outside the job, against the local run's wall time.
               "path_ratio_median": statistics.median(
                   (r["local_wall_s"] + r["amqp_outside_s"] - r["local_outside_s"])
                   / r["local_wall_s"] for r in pairs),
               "step_ratio_median": statistics.median(
                   r["amqp_step_s"] / r["local_step_s"] for r in pairs
                   if r["local_step_s"] and r["amqp_step_s"]),
               "target": 1.05}
        row["met"] = row["path_ratio_median"] <= 1.05 and row["step_ratio_median"] <= 1.05
        rows.append(row)
    print(f"{'job':<14} {'local s':>8} {'amqp s':>8} {'wall ratio':>10} {'outside l/a s':>14} "
          f"{'path ratio':>10} {'step ratio':>10}")
    for r in rows:
        print(f"{r['job']:<14} {r['local_median_s']:>8.2f} {r['amqp_median_s']:>8.2f} "
              f"{r['ratio_median']:>10.3f} {r['local_outside_median_s']:>6.2f}/"
              f"{r['amqp_outside_median_s']:<6.2f} {r['path_ratio_median']:>10.3f} "
              f"{r['step_ratio_median']:>10.3f}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"pairs": args.pairs, "rows": rows, "raw": raw,
                       "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                   "load_average_at_start": load_start,
                                   "load_average_at_end": os.getloadavg()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
