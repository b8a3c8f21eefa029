#!/usr/bin/env python3
"""The AMQP path against a local `run` of the same job, alternating, in one run.

Starts its own rabbitmq-server (own epmd, data dir and free ports on 127.0.0.1,
stopped by PID) and one `solstice-runner node --amqp` (1 slot). Then, pair after
pair (which side goes first flips every pair), the same job runs once through
`solstice-runner run` and once through `solstice-runner submit --amqp` (published,
taken by the node, events and result back over the broker). Reported: each side's
median wall time and the median of the per-pair ratios (AMQP / local). Jobs: a
single `true` step (the fixed overhead) and a step streaming 16 MiB (the events
path under load).

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
                walls = {}
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
                    log(f"pair {pair + 1} {kind} {side}: {walls[side]:.2f} s")
                raw.append({"pair": pair + 1, "job": kind, "order": order,
                            "local_wall_s": walls["local"], "amqp_wall_s": walls["amqp"],
                            "ratio": walls["amqp"] / walls["local"]})
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
        rows.append({"job": kind,
                     "local_median_s": statistics.median(r["local_wall_s"] for r in pairs),
                     "amqp_median_s": statistics.median(r["amqp_wall_s"] for r in pairs),
                     "ratio_median": statistics.median(r["ratio"] for r in pairs),
                     "target": 1.05})
        rows[-1]["met"] = rows[-1]["ratio_median"] <= 1.05
    print(f"{'job':<14} {'local s':>9} {'amqp s':>9} {'ratio':>7}  target  met")
    for r in rows:
        print(f"{r['job']:<14} {r['local_median_s']:>9.2f} {r['amqp_median_s']:>9.2f} "
              f"{r['ratio_median']:>7.3f}  <=1.05  {'yes' if r['met'] else 'NO'}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"pairs": args.pairs, "rows": rows, "raw": raw,
                       "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                                   "load_average_at_start": load_start,
                                   "load_average_at_end": os.getloadavg()}}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
