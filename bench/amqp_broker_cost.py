#!/usr/bin/env python3
"""What a stream of job events costs the broker, without a VM.

Starts its own rabbitmq-server (as bench/amqp_overhead.py does) and runs
`amqp_broker_probe` (ninja amqp_broker_probe) against it: first what the broker
answers when a follower's queue is declared again with another x-queue-version,
then, round after round, each configuration once (the order rotating), reading
the broker's CPU time (utime+stime of its processes, /proc) around each run. A
configuration is QUEUE_VERSION:MESSAGES:BYTES:INTERVAL_MS (0: no x-queue-version,
the broker's default); the defaults are 16 MiB as a step's output goes out in
batches every 40 ms (about 200 messages) and every 100 ms, in classic queue
versions 1 and 2.

    bench/amqp_broker_cost.py --probe build/bench/amqp_broker_probe [--rounds 3] \\
        [--config 0:200:83886:40 ...] [--json OUT]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from amqp_overhead import Broker, log  # noqa: E402
from amqp_step_cpu import cpu_s, tree  # noqa: E402

DEFAULT_CONFIGS = ["0:200:83886:40", "2:200:83886:40", "0:80:209715:100", "2:80:209715:100"]


def broker_cpu(broker):
    return sum(cpu_s(pid) or 0.0 for pid in tree(broker.server.pid))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", action="append")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    configs = args.config or DEFAULT_CONFIGS
    load_start = os.getloadavg()
    work = tempfile.mkdtemp(prefix="solstice-amqp-cost-")
    broker = Broker(work)
    raw, redeclare = [], {}
    try:
        probe = [os.path.abspath(args.probe), broker.url, broker.password_file]
        for first, then in ((0, 2), (2, 0), (1, 2), (2, 2)):
            answer = subprocess.run(probe + ["redeclare", str(first), str(then)],
                                    capture_output=True, text=True, check=True).stdout
            redeclare[f"{first} then {then}"] = answer.strip()
            log(f"declared with x-queue-version {first}, then {then}: {answer.strip()!r}")
        for rnd in range(args.rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
            for config in order:
                version, messages, size, interval = config.split(":")
                before = broker_cpu(broker)
                elapsed = float(subprocess.run(probe + ["stream", version, messages, size,
                                                        interval],
                                               capture_output=True, text=True,
                                               check=True).stdout)
                used = broker_cpu(broker) - before
                raw.append({"round": rnd + 1, "config": config, "elapsed_s": elapsed,
                            "broker_cpu_s": round(used, 3), "load_average": os.getloadavg()[0]})
                log(f"round {rnd + 1} {config}: {elapsed:.2f} s, broker CPU {used:.3f} s")
    finally:
        broker.stop()
        subprocess.call(["rm", "-rf", work])
    summary = {c: statistics.median(r["broker_cpu_s"] for r in raw if r["config"] == c)
               for c in configs}
    for config, median in summary.items():
        log(f"{config}: broker CPU median {median:.3f} s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"configs": configs, "rounds": args.rounds, "redeclare": redeclare,
                       "raw": raw, "broker_cpu_median_s": summary, "cpus": os.cpu_count(),
                       "load_average_at_start": load_start,
                       "load_average_at_end": os.getloadavg()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
