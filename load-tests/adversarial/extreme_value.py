#!/usr/bin/env python3
"""One extreme event against everyone's list (issue 12, case 2), as one command.

Starts an embedded liverec with the demo catalogue (warm model, no live traffic), reads a new
visitor's list and the monitor's revenue per user, then, as one user: posts `rating` 1e9 and
1e308 and a `purchase` of 1e37 (each must be refused with 422 naming `value`), and the largest
values the limits allow, many times over, for an item that is not in the visitor's list. Passes
when every out-of-range event is refused, the visitor's list is unchanged or holds the pushed
item no higher than one place (its share of popularity is one user's), and revenue per user stays
finite and no more than the amounts actually posted.

    python3 load-tests/adversarial/extreme_value.py --bin target/debug/liverec

Only 127.0.0.1 is contacted; it stops by itself. Standard library only.
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/liverec")
    parser.add_argument("--repeat", type=int, default=200, help="in-range extreme events from the one user")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(os.path.join(tempfile.mkdtemp(prefix="liverec-extreme-"), "server.log"), "w")
    server = subprocess.Popen([os.path.abspath(args.bin), "serve", "--listen", f"127.0.0.1:{port}"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                              env=dict(os.environ, LIVEREC_LOG__LEVEL="warn", LIVEREC_TRAINER__ENABLED="false"))
    failures = []
    try:
        deadline = time.time() + 180
        while True:
            try:
                if call(base, "GET", "/readyz")[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit(f"the server did not become ready; see {log.name}")
            time.sleep(0.3)
        _, before = call(base, "GET", "/v1/users/visitor-1/recommendations?k=10")
        items_before = [i["item_id"] for i in before["items"]]
        _, catalogue = call(base, "GET", "/v1/users/visitor-2/recommendations?k=100")
        target = next(i["item_id"] for i in catalogue["items"][50:] if i["item_id"] not in items_before)
        for event_type, value in (("rating", 1e9), ("rating", 1e308), ("purchase", 1e37), ("dwell", -1.0)):
            status, body = call(base, "POST", "/v1/events",
                                {"user_id": "mallory", "item_id": target, "event_type": event_type, "value": value})
            if status != 422 or "value" not in json.dumps(body):
                failures.append(f"{event_type} value {value}: {status} {body}")
        events = []
        for n in range(args.repeat):
            events += [{"user_id": "mallory", "item_id": target, "event_type": "rating", "value": 5.0},
                       {"user_id": "mallory", "item_id": target, "event_type": "purchase", "value": 1e6}]
        for start in range(0, len(events), 500):
            status, body = call(base, "POST", "/v1/events", events[start:start + 500])
            if status != 202:
                failures.append(f"in-range batch: {status} {body}")
        # Wait until the user's events are applied (their profile holds them), then compare.
        deadline = time.time() + 120
        while call(base, "GET", "/v1/users/mallory/export")[1]["profile"]["interactions"] == []:
            if time.time() > deadline:
                sys.exit("mallory's events were never applied")
            time.sleep(0.2)
        _, after = call(base, "GET", "/v1/users/visitor-3/recommendations?k=10")
        items_after = [i["item_id"] for i in after["items"]]
        rank = items_after.index(target) if target in items_after else None
        _, monitor = call(base, "GET", "/v1/monitor")
        print(f"pushed item {target}: new visitor's rank {rank} (top-10 before {items_before[:5]}..., "
              f"after {items_after[:5]}...)")
        if rank is not None and rank < 9:
            failures.append(f"one user's events lifted {target} to rank {rank + 1} of a new visitor's list")
        for key in ("revenue_per_user", "revenue"):
            for found in _values(monitor, key):
                # At most everything the one user bought: finite, and nothing beyond what was posted.
                if not math.isfinite(found) or found > args.repeat * 1e6:
                    failures.append(f"/v1/monitor {key} = {found}")
    finally:
        server.terminate()
        server.wait(30)
    for f in failures:
        print("FAIL:", f)
    print("PASS" if not failures else "FAIL")
    sys.exit(1 if failures else 0)


def _values(node, key):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key and isinstance(v, (int, float)):
                yield float(v)
            else:
                yield from _values(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _values(v, key)


if __name__ == "__main__":
    main()
