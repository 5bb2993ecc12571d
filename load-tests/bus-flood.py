#!/usr/bin/env python3
"""Large batches faster than the sessions apply them: what the in-process bus holds.

Starts `liverec serve` (embedded mode, loopback only, run from a fresh temporary directory) and
posts `--batches` batches of 1,000 view events (50 users a batch) from four connections as fast
as the server answers, counting the statuses; samples the server's resident size every 0.2 s and
prints the peak. A 503 is the bus refusing a batch whole (`bus.queue_capacity` batches or
`bus.queue_events` events a partition); the batch is not retried. Stops the server at the end.

    cargo build --release --bin liverec && python3 load-tests/bus-flood.py --batches 3000
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    parser.add_argument("--bin", default=os.path.join(root, "target", "release", "liverec"))
    parser.add_argument("--port", type=int, default=18092)
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()

    env = dict(os.environ, LIVEREC_LOG__LEVEL="warn")
    server = subprocess.Popen(
        [os.path.abspath(args.bin), "serve", "--listen", f"127.0.0.1:{args.port}"],
        env=env,
        cwd=tempfile.mkdtemp(prefix="liverec-flood-"),
    )

    def rss_mb():
        with open(f"/proc/{server.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    try:
        for _ in range(600):
            if server.poll() is not None:
                sys.exit(f"liverec serve exited at start (status {server.returncode})")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("server did not start")

        baseline = rss_mb()
        peak, statuses, lock, done = [baseline], {}, threading.Lock(), threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_mb())
                time.sleep(0.2)

        def post(first):
            conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=120)
            for batch in range(first, args.batches, 4):
                events = [
                    {"user_id": f"f{batch}-{n % 50}", "item_id": f"item-{n % 400:04d}", "event_type": "view"}
                    for n in range(1000)
                ]
                conn.request("POST", "/v1/events", json.dumps(events), {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                with lock:
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.time()
        posters = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for poster in posters:
            poster.start()
        for poster in posters:
            poster.join()
        done.set()
        sampler.join()
        print(
            f"{args.batches} POSTs of 1,000 events in {time.time() - started:.0f} s, statuses {statuses}, "
            f"resident {baseline:.0f} MB at the start, {peak[0]:.0f} MB at the peak"
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
