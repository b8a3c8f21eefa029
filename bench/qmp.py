#!/usr/bin/env python3
"""Minimal QMP client for the baseline: `qmp.py SOCKET port` prints the host port
QEMU bound for the SSH forward; `qmp.py SOCKET powerdown` sends system_powerdown."""
import json
import re
import socket
import sys
import time


def connect(path, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in ("port", "powerdown"):
        sys.exit("usage: qmp.py SOCKET port|powerdown")
    sock = connect(sys.argv[1])
    stream = sock.makefile("rw")

    def reply():
        while True:
            line = stream.readline()
            if not line:
                sys.exit("qmp.py: QEMU closed the QMP socket")
            message = json.loads(line)
            if "event" not in message:
                return message

    def command(name, **arguments):
        stream.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        stream.flush()
        return reply()

    reply()  # greeting
    command("qmp_capabilities")
    if sys.argv[2] == "port":
        out = command("human-monitor-command", **{"command-line": "info usernet"})["return"]
        found = re.search(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)", out)
        if not found:
            sys.exit("qmp.py: no host forward in: " + out)
        print(found.group(1))
    else:
        result = command("system_powerdown")
        if "error" in result:
            sys.exit("qmp.py: system_powerdown failed: " + json.dumps(result))


if __name__ == "__main__":
    main()
