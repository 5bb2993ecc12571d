#!/usr/bin/env python3
"""Resident memory of the embedded mode under many distinct user ids, and after they go idle.

Starts `liverec serve` (loopback only, embedded mode) with short idle times, then:

1. wave 1: `--users` users (default 200,000), one view each, posted in batches of 1,000;
2. waits until every session stopped, the memory store dropped the idle profiles and the resident
   size set no new low for 10 s (the allocator hands pages back over seconds);
3. wave 2: as many new users again, and waits again;
4. `--gets` GETs (default 100,000) for users the server has never seen (the cold-start path);

and prints the resident size (VmRSS of /proc/PID/status, with its anonymous and file-backed
parts) at each step, the session and stored-profile counts from /metrics, jemalloc's own account
of the heap (the `liverec_allocator_*_bytes` gauges: allocated, active, metadata, resident, mapped,
retained) and the process's threads (by name), at the baseline, at each wave's peak and when idle.
Stops the server and itself at the end.

    cargo build --release --bin liverec && python3 load-tests/memory-soak.py
    python3 load-tests/memory-soak.py --bin target/debug/liverec --users 50000 --gets 20000

`--flood N` instead posts N batches of 1,000 view events (50 users each) from four connections as
fast as the server answers, without retrying a 503 (the bus refusing a batch whole: at
`bus.queue_capacity` batches or `bus.queue_events` events a partition), and prints the statuses
and the peak resident size:

    python3 load-tests/memory-soak.py --bin target/release/liverec --flood 3000

`--bounded` instead keeps the default idle times (sessions 5 min, profiles a day) and posts
`--users` users (e.g. 1,000,000) in one wave: the caps (`session.max_active`,
`store.memory_max_profiles`) are then what bounds memory.
"""

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

PORT = 18091
HOST = "127.0.0.1"


def rss_mb(pid, field="VmRSS"):
    """A resident size of /proc/PID/status in MB: VmRSS (all), RssAnon (heap and stacks) or
    RssFile (pages of the binary and libraries)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def request(conn, method, path, body=None):
    """One request on `conn`, or on a fresh connection when `conn` is None (the server closes
    idle keep-alive connections while the script waits)."""
    headers = {"content-type": "application/json"} if body is not None else {}
    fresh = conn is None
    if fresh:
        conn = http.client.HTTPConnection(HOST, PORT, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if fresh:
            conn.close()


def threads(pid):
    """The process's threads, counted by name with the digits left out ("actix-rt|system:0:3"
    counts as "actix-rt|system::")."""
    names = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                name = re.sub(r"[0-9]+", "", comm.read().strip())
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return names


def thread_summary(names):
    listed = ", ".join(f"{name} x{n}" for name, n in sorted(names.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(names.values())} ({listed})"


ALLOCATOR = ("allocated", "active", "metadata", "resident", "mapped", "retained")


def allocator_summary(m):
    """jemalloc's figures from a /metrics reading, in MB ('-' on a build without the gauges)."""
    parts = []
    for name in ALLOCATOR:
        value = m.get(f"liverec_allocator_{name}_bytes")
        parts.append(f"{name} {value / 2**20:.1f}" if value is not None else f"{name} -")
    return "jemalloc MB: " + ", ".join(parts)


def metrics(conn):
    _, text = request(conn, "GET", "/metrics")
    values = {}
    for line in text.decode().splitlines():
        match = re.match(r"^(liverec_[a-z_]+) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def post_wave(conn, prefix, users, batch):
    for start in range(0, users, batch):
        events = [
            {"user_id": f"{prefix}-{n}", "item_id": f"item-{n % 400:04d}", "event_type": "view"}
            for n in range(start, min(users, start + batch))
        ]
        while True:
            status, body = request(conn, "POST", "/v1/events", json.dumps(events))
            if status == 202:
                break
            if status != 503:
                sys.exit(f"events refused: {status} {body[:200]!r}")
            time.sleep(0.05)  # the bus is full: the documented backpressure, retry


def settle_rss(pid, quiet_secs=10, longest_secs=60):
    """Waits until the resident size set no new low for `quiet_secs` (the allocator returns freed
    pages to the OS over seconds, not at once), at most `longest_secs`."""
    low, since, started = rss_mb(pid), time.time(), time.time()
    while time.time() - since < quiet_secs and time.time() - started < longest_secs:
        time.sleep(1)
        now = rss_mb(pid)
        if now < low - 0.1:
            low, since = now, time.time()


class Peaks(threading.Thread):
    """Samples the resident size, the running sessions and the threads every second while a wave
    runs; keeps the allocator's figures and the anonymous part as of the highest resident size."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.rss, self.sessions = pid, 0.0, 0
        self.anon, self.at_peak, self.threads = 0.0, {}, {}
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(1.0):
            rss = rss_mb(self.pid)
            names = threads(self.pid)
            if sum(names.values()) > sum(self.threads.values()):
                self.threads = names
            try:
                m = metrics(None)
            except OSError:
                continue
            self.sessions = max(self.sessions, int(m.get("liverec_sessions_active", 0)))
            if rss > self.rss:
                self.rss, self.anon, self.at_peak = rss, rss_mb(self.pid, "RssAnon"), m

    def finish(self):
        self.done.set()
        self.join()


def wait_applied(conn, target, what):
    last, moved = -1.0, time.time()
    while True:
        applied = metrics(conn).get("liverec_session_applied_events_total", 0.0)
        if applied >= target:
            return
        if applied != last:
            last, moved = applied, time.time()
        if time.time() - moved > 120:
            sys.exit(f"stalled waiting for {what}: {applied} of {target} applied")
        time.sleep(0.5)


def wait_idle(conn, deadline_secs):
    """Until no session runs and the store holds no profile (or the deadline passes)."""
    end = time.time() + deadline_secs
    while time.time() < end:
        m = metrics(conn)
        if m.get("liverec_sessions_active", 1) == 0 and m.get("liverec_store_memory_profiles", 1) == 0:
            # The monitor's window passes, and one more housekeeping round returns freed heap.
            time.sleep(25)
            return True
        time.sleep(0.5)
    return False


def flood(batches):
    """Posts `batches` batches of 1,000 events from four connections, never retrying; returns
    the count of each status."""
    statuses, lock = {}, threading.Lock()

    def worker(first):
        conn = http.client.HTTPConnection(HOST, PORT, timeout=120)
        for batch in range(first, batches, 4):
            events = [
                {"user_id": f"f{batch}-{n % 50}", "item_id": f"item-{n % 400:04d}", "event_type": "view"}
                for n in range(1000)
            ]
            status, _ = request(conn, "POST", "/v1/events", json.dumps(events))
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return statuses


def cold_gets(gets, threads):
    def worker(index):
        conn = http.client.HTTPConnection(HOST, PORT, timeout=30)
        for n in range(index, gets, threads):
            status, body = request(conn, "GET", f"/v1/users/stranger-{n}/recommendations")
            if status != 200:
                sys.exit(f"GET failed: {status} {body[:200]!r}")

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    parser.add_argument("--bin", default=os.path.join(root, "target", "release", "liverec"))
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--gets", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument(
        "--before-bounds", action="store_true", help="a build from before the memory bounds (no store.memory_* keys)"
    )
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--idle-deadline", type=int, default=180, help="longest wait for idle, seconds")
    parser.add_argument("--bounded", action="store_true", help="default idle times; one wave of --users")
    parser.add_argument("--flood", type=int, metavar="N", help="N batches of 1,000 events, no retries, then stop")
    parser.add_argument(
        "--smaps", metavar="DIR", help="copy /proc/PID/smaps into DIR at each step (to diff mappings)"
    )
    args = parser.parse_args()
    args.bin = os.path.abspath(args.bin)
    globals()["PORT"] = args.port

    env = dict(os.environ)
    env.update(
        {
            "LIVEREC_LISTEN": f"{HOST}:{PORT}",
            "LIVEREC_LOG__LEVEL": "warn",
            # The retained event log (the trainer's window) holds events by age: keep it short,
            # so that what remains after the waves is what sessions and the store hold.
            "LIVEREC_TRAINER__WINDOW_SECS": "10",
            # The monitor keeps each active user's counts for its window (5 min by default).
            "LIVEREC_MONITOR__WINDOW_SECS": "20",
            "LIVEREC_MONITOR__BUCKET_SECS": "10",
        }
    )
    if not args.bounded:
        env.update({"LIVEREC_SESSION__IDLE_TTL_MS": "10000"})
        if not args.before_bounds:
            env.update({"LIVEREC_STORE__MEMORY_IDLE_TTL_SECS": "10"})
    workdir = tempfile.mkdtemp(prefix="liverec-soak-")
    server = subprocess.Popen([args.bin, "serve"], env=env, cwd=workdir)
    rows = []
    try:
        conn = None  # a fresh connection per control request
        for _ in range(600):
            if server.poll() is not None:
                sys.exit(f"liverec serve exited at start (status {server.returncode})")
            try:
                if request(conn, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("server did not start")

        def record(step, settle=False):
            if settle:
                settle_rss(server.pid)
            m = metrics(conn)
            row = (
                step,
                rss_mb(server.pid),
                int(m.get("liverec_sessions_active", -1)),
                int(m.get("liverec_store_memory_profiles", -1)),
            )
            rows.append(row)
            if args.smaps:
                os.makedirs(args.smaps, exist_ok=True)
                name = f"{len(rows):02d}-" + re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")[:40]
                with open(f"/proc/{server.pid}/smaps") as src, open(os.path.join(args.smaps, name), "w") as dst:
                    dst.write(src.read())
            anon, file = rss_mb(server.pid, "RssAnon"), rss_mb(server.pid, "RssFile")
            print(
                f"{row[0]:<44} rss {row[1]:8.1f} MB (anon {anon:.1f}, file {file:.1f})"
                f"  sessions {row[2]:>7}  stored profiles {row[3]:>7}",
                flush=True,
            )
            print(f"  {allocator_summary(m)}; threads {thread_summary(threads(server.pid))}", flush=True)

        time.sleep(2)
        record("baseline", settle=True)
        if args.flood:
            started = time.time()
            peaks = Peaks(server.pid)
            peaks.start()
            statuses = flood(args.flood)
            peaks.finish()
            print(
                f"{args.flood} POSTs of 1,000 events in {time.time() - started:.0f} s, statuses {statuses},"
                f" peak rss {peaks.rss:.1f} MB (anon {peaks.anon:.1f})",
                flush=True,
            )
            return
        applied = metrics(conn).get("liverec_session_applied_events_total", 0.0)
        waves = 1 if args.bounded else 2
        for wave in range(1, waves + 1):
            started = time.time()
            peaks = Peaks(server.pid)
            peaks.start()
            post_wave(conn, f"w{wave}", args.users, args.batch)
            applied += args.users
            wait_applied(conn, applied, f"wave {wave}")
            peaks.finish()
            record(f"wave {wave}: {args.users} users applied ({time.time() - started:.0f} s)")
            print(
                f"  during wave {wave}: peak rss {peaks.rss:.1f} MB (anon {peaks.anon:.1f}),"
                f" peak sessions {peaks.sessions}",
                flush=True,
            )
            print(f"  at the peak: {allocator_summary(peaks.at_peak)}", flush=True)
            print(f"  most threads during the wave: {thread_summary(peaks.threads)}", flush=True)
            if not args.bounded:
                idle = wait_idle(conn, args.idle_deadline)
                record(f"wave {wave}: sessions and profiles idle{'' if idle else ' (deadline passed)'}", settle=True)
                # The retained event log drops events past its window when the next one is
                # appended: one more event, then idle again.
                request(conn, "POST", "/v1/events", json.dumps({"user_id": "tick", "item_id": "item-0001", "event_type": "view"}))
                applied += 1
                wait_applied(conn, applied, "the tick event")
                idle = wait_idle(conn, args.idle_deadline)
                record(f"wave {wave}: + one event, idle again{'' if idle else ' (deadline passed)'}", settle=True)
        if args.gets:
            started = time.time()
            cold_gets(args.gets, 8)
            record(f"{args.gets} GETs for unknown users ({time.time() - started:.0f} s)")
        base = rows[0][1]
        print(f"last / baseline: {rows[-1][1] / base:.2f}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
