#!/usr/bin/env python3
"""Erasure under load, production mode (issue 12, case 1), as one command.

Two liverec instances share one Kafka consumer group and one Redis. Four users post
continuously while 120 erasures (`DELETE /v1/users/{id}`) run over about 20 s; then 25,000 events
for 250 other users are posted. The run passes when every one of those 25,000 events is applied
(each user's stored event ids hold each of its events exactly once) and no instance reports its
ingest stalled. It stops by itself: it fails when the applied count makes no progress for
--stall seconds, and it stops the instances it started.

    eval "$(scripts/services up)"          # Redis and Kafka, as the test command starts them
    python3 load-tests/adversarial/erasure_under_load.py --bin target/release/liverec

Only 127.0.0.1 is contacted. Standard library only.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    def __init__(self, binary, config, env, workdir, name):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", config, "--listen", f"127.0.0.1:{self.port}"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def metric(self, name):
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def request(instance, method, path, key, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(instance.base + path, data=data, method=method)
    req.add_header("authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_ready(instance, deadline_s=120):
    start = time.time()
    while time.time() - start < deadline_s:
        if instance.proc.poll() is not None:
            sys.exit(f"an instance exited at start; see its log ({instance.log.name})")
        try:
            with urllib.request.urlopen(instance.base + "/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    sys.exit(f"an instance was not ready after {deadline_s} s")


def applied(instances):
    return sum(i.metric("liverec_session_applied_events_total") for i in instances)


def wait_settled(instances, stall_s, target=None):
    """Waits until the applied count reaches `target` (or stops moving when None); fails when it
    makes no progress for `stall_s` seconds before that."""
    last, last_change, settled_since = applied(instances), time.time(), None
    while True:
        time.sleep(0.5)
        now_applied = applied(instances)
        if now_applied != last:
            last, last_change, settled_since = now_applied, time.time(), None
        if target is not None and now_applied >= target:
            return now_applied
        if target is None:
            settled_since = settled_since or time.time()
            if time.time() - last_change >= 3:
                return now_applied
        if time.time() - last_change > stall_s:
            stalled = [i.metric("liverec_kafka_ingest_stalled") for i in instances]
            sys.exit(f"FAIL: no progress for {stall_s} s at {now_applied:.0f} applied "
                     f"(target {target}); liverec_kafka_ingest_stalled per instance: {stalled}")


def digest(event_id):
    """An event id as the export lists it: its 64-bit FNV-1a digest in 16 hex digits (the
    de-duplication window keeps digests, src/store/mod.rs `EventDigest`)."""
    h = 0xCBF29CE484222325
    for byte in event_id.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/liverec", help="the liverec binary")
    parser.add_argument("--events", type=int, default=25_000)
    parser.add_argument("--users", type=int, default=250)
    parser.add_argument("--erasures", type=int, default=120)
    parser.add_argument("--stop-one", action="store_true",
                        help="stop the second instance with SIGTERM half way through the 25,000 events "
                             "(the first must take over its partitions and apply everything)")
    parser.add_argument("--stall", type=float, default=120, help="seconds without progress that fail the run")
    args = parser.parse_args()
    for var in ("LIVEREC_TEST_KAFKA_BROKERS", "LIVEREC_TEST_REDIS_URL"):
        if var not in os.environ:
            sys.exit(f"{var} is not set: start the services first: eval \"$(scripts/services up)\"")
    binary = os.path.abspath(args.bin)
    workdir = tempfile.mkdtemp(prefix="liverec-adversarial-")
    made = subprocess.run([binary, "key", "--id", "adversarial", "--role", "admin"],
                          check=True, capture_output=True, text=True)
    key = made.stdout.split()[0]
    entry = made.stderr[made.stderr.index("[[auth.api_keys]]"):]
    run = uuid.uuid4().hex[:8]
    config = os.path.join(workdir, "liverec.toml")
    with open(config, "w") as f:
        f.write(f"[demo]\nenabled = false\n\n[bus]\nkind = \"kafka\"\n\n[store]\nkind = \"redis\"\n\n"
                f"[kafka]\nbrokers = \"{os.environ['LIVEREC_TEST_KAFKA_BROKERS']}\"\n"
                f"events_topic = \"adv-{run}\"\ndead_letter_topic = \"adv-{run}.dlq\"\ngroup_id = \"adv-{run}\"\n"
                f"partitions = 8\n\n[redis]\nurl = \"{os.environ['LIVEREC_TEST_REDIS_URL']}\"\nkey_prefix = \"adv-{run}\"\n\n"
                f"[session]\ndedupe_window = 1000\n\n[auth]\ntoken_secret = \"{uuid.uuid4().hex}{uuid.uuid4().hex}\"\n\n{entry}")
    env = dict(os.environ, LIVEREC_LOG__LEVEL="warn")
    instances = [Instance(binary, config, env, workdir, f"instance-{n}") for n in (1, 2)]
    try:
        for i in instances:
            wait_ready(i)
        print(f"two instances up (logs in {workdir})", flush=True)
        stop = threading.Event()
        posted = [0]

        def poster(user, instance):
            n = 0
            while not stop.is_set():
                status, _ = request(instance, "POST", "/v1/events", key,
                                    {"user_id": user, "item_id": f"item-{n % 50}", "event_type": "view"})
                if status == 202:
                    posted[0] += 1
                n += 1

        threads = [threading.Thread(target=poster, args=(f"busy-{u}", instances[u % 2])) for u in range(4)]
        for t in threads:
            t.start()
        started = time.time()
        for n in range(args.erasures):
            user = f"busy-{n % 4}" if n % 3 else f"gone-{n}"
            status, body = request(instances[n % 2], "DELETE", f"/v1/users/{user}", key)
            if status != 200:
                sys.exit(f"FAIL: DELETE {user} answered {status}: {body[:200]!r}")
            time.sleep(max(0.0, started + (n + 1) * 20 / args.erasures - time.time()))
        stop.set()
        for t in threads:
            t.join()
        print(f"{args.erasures} erasures over {time.time() - started:.1f} s while 4 users posted "
              f"{posted[0]} events", flush=True)
        before = wait_settled(instances, args.stall)
        t0 = time.time()
        batch = 100
        live = list(instances)
        for start in range(0, args.events, batch):
            if args.stop_one and len(live) == 2 and start >= args.events // 2:
                stopping = time.time()
                live[1].stop()
                live = live[:1]
                print(f"stopped the second instance with SIGTERM in {time.time() - stopping:.1f} s", flush=True)
            events = [{"user_id": f"load-{(start + i) % args.users}", "item_id": f"item-{(start + i) % 400}",
                       "event_type": "view", "event_id": f"{run}-{start + i}"} for i in range(batch)]
            status, body = request(live[(start // batch) % len(live)], "POST", "/v1/events", key, events)
            if status != 202 or json.loads(body)["accepted"] != batch:
                sys.exit(f"FAIL: a batch answered {status}: {body[:200]!r}")
        print(f"posted {args.events} events for {args.users} users in {time.time() - t0:.1f} s", flush=True)
        # Every user's stored event ids (the de-duplication window holds them all, as digests)
        # must hold each of its events exactly once, whichever instance applied them and whatever
        # stopped.
        posted = {digest(f"{run}-{i}") for i in range(args.events)}

        def stored():
            ids = []
            for u in range(args.users):
                status, body = request(live[0], "GET", f"/v1/users/load-{u}/export", key)
                if status == 200:
                    ids += [e for e in json.loads(body)["profile"]["event_ids"] if e in posted]
            return ids

        last, last_change = -1, time.time()
        while True:
            ids = stored()
            if len(ids) != last:
                last, last_change = len(ids), time.time()
            if len(set(ids)) >= args.events:
                break
            if time.time() - last_change > args.stall:
                stalled = [i.metric("liverec_kafka_ingest_stalled") for i in live]
                sys.exit(f"FAIL: no progress for {args.stall} s at {len(set(ids))} of {args.events} stored "
                         f"(liverec_kafka_ingest_stalled per live instance: {stalled})")
            time.sleep(1)
        took = time.time() - t0
        time.sleep(3)  # late doubles would show here
        ids = stored()
        pauses = sum(i.metric("liverec_kafka_pauses_total") for i in live)
        stalled = max(i.metric("liverec_kafka_ingest_stalled") for i in live)
        print(f"stored {len(set(ids))} of {args.events} distinct events ({len(ids) - len(set(ids))} doubled) "
              f"{took:.1f} s after the first was posted (pauses {pauses:.0f}, stalled now {stalled:.0f})", flush=True)
        if len(ids) != args.events or len(set(ids)) != args.events:
            sys.exit(f"FAIL: expected each of {args.events} events exactly once")
        print("PASS")
    finally:
        for i in instances:
            i.stop()


if __name__ == "__main__":
    main()
