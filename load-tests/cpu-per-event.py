#!/usr/bin/env python3
"""CPU and thread wake-ups per event of the embedded server, for one build or several alternated.

For each run: starts a fresh `liverec serve` (embedded default, loopback, from an empty temporary
directory, `limits.connections_per_ip` off since every socket comes from one address), runs the
load tool against it, and prints one line: the server's CPU microseconds per event (`--server-pid`,
see docs/performance.md), event-to-push p50 / p99 / p99.9, the context switches of all the
server's threads during the run per accepted event (`voluntary_ctxt_switches` of
/proc/PID/task/*/status: each is a thread that went to sleep and was woken again), the machine's
load average before and after, and errors. With several `--bin`, the runs alternate between them
(A B A B ...), so a change in the machine's load hits both alike. Stops each server and itself.

    cargo build --release --locked -p liverec --bin liverec -p liverec-load --bin liverec-load
    python3 load-tests/cpu-per-event.py --bin OLD/liverec --bin target/release/liverec --runs 3
    python3 load-tests/cpu-per-event.py --scenario headline --runs 2

`--scenario rest` (the default) is `liverec-load rest --rate 2000 --duration 15 --users 2000
--sockets 2000`, the command of "CPU per event on the embedded path"; `--scenario headline` is
load-tests/scenarios/headline.toml (5,000 events/s, 10,000 subscriptions). `--threads` adds the
context switches and CPU seconds of each thread, by name.
"""

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def threads(pid):
    """{tid: (name, voluntary context switches, CPU ticks)} of every thread of `pid`."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as comm:
                name = comm.read().strip()
            switches = 0
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches:"):
                        switches = int(line.split()[1])
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        found[tid] = (name, switches, ticks)
    return found


def wait_healthy(port, server, deadline_secs=60):
    """Polls /healthz until it answers; fails if the server exits or stalls that long."""
    deadline = time.monotonic() + deadline_secs
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited at start (status {server.returncode})")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"the server did not answer /healthz within {deadline_secs} s")


def one_run(binary, load, scenario, port, show_threads):
    workdir = tempfile.mkdtemp(prefix="liverec-cpu-")
    out = os.path.join(workdir, "report")
    env = dict(os.environ, LIVEREC_LIMITS__CONNECTIONS_PER_IP="0")
    with open(os.path.join(workdir, "server.log"), "w") as log:
        server = subprocess.Popen(
            [binary, "serve", "--listen", f"{HOST}:{port}"], cwd=workdir, env=env, stdout=log, stderr=log
        )
    try:
        # The folder (server log, load report) is kept only if the run fails.
        wait_healthy(port, server)
        target = f"http://{HOST}:{port}"
        if scenario == "rest":
            command = [load, "rest", "--target", target, "--rate", "2000", "--duration", "15", "--users", "2000",
                       "--sockets", "2000"]
        else:
            command = [load, "--target", target, "--scenario", os.path.join(HERE, "scenarios", f"{scenario}.toml")]
        command += ["--server-pid", str(server.pid), "--out", out]
        load_before = os.getloadavg()[0]
        before = threads(server.pid)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = threads(server.pid)
        load_after = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait()
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    shutil.rmtree(workdir, ignore_errors=True)
    accepted = max(1, report["events_accepted"])
    switches = sum(s for _, s, _ in after.values()) - sum(s for _, s, _ in before.values())
    push = report["event_to_push_ms"]
    work = report["server"]["work"]
    print(
        f"{scenario} {binary}: load {load_before:.1f}-{load_after:.1f}, "
        f"CPU {work['cpu_secs_per_event'] * 1e6:.1f} us/event, "
        f"event-to-push p50 {push['p50']:.2f} / p99 {push['p99']:.2f} / p99.9 {push['p999']:.2f} ms, "
        f"{switches / accepted:.2f} context switches/event, {report['errors']} errors",
        flush=True,
    )
    if show_threads:
        for tid, (name, switches_after, ticks_after) in sorted(after.items()):
            _, switches_before, ticks_before = before.get(tid, (name, 0, 0))
            ticks = os.sysconf("SC_CLK_TCK")
            print(f"    {tid} {name:<16} {(switches_after - switches_before) / accepted:6.2f} switches/event "
                  f"{(ticks_after - ticks_before) / ticks:6.2f} CPU s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", action="append", help="liverec binaries, alternated (default target/release/liverec)")
    parser.add_argument("--load", default=os.path.join(ROOT, "target", "release", "liverec-load"))
    parser.add_argument("--scenario", default="rest", help="rest (default), or a scenario file's name: headline")
    parser.add_argument("--runs", type=int, default=2, help="runs of each binary")
    parser.add_argument("--port", type=int, default=18190)
    parser.add_argument("--threads", action="store_true", help="per-thread switches and CPU seconds")
    args = parser.parse_args()
    binaries = [os.path.abspath(b) for b in (args.bin or [os.path.join(ROOT, "target", "release", "liverec")])]
    for binary in binaries + [args.load]:
        if not os.access(binary, os.X_OK):
            sys.exit(f"no executable at {binary}: build it first (see the docstring)")
    for _ in range(args.runs):
        for binary in binaries:
            one_run(binary, os.path.abspath(args.load), args.scenario, args.port, args.threads)


if __name__ == "__main__":
    main()
