#!/usr/bin/env python3
"""The closed loop end to end on this machine, with timings.

Starts `liverec serve --config config/loop-demo.toml` (release build, empty temporary registry,
loopback only), runs `liverec simulate` against it with a taste shift, asks for a first version
after 20 s, and reports: the loop's history with times relative to the start, the simulated CTR
per bucket, and the model-stage latency (time a session waits for its scoring) while no training
runs and while one does. Stops everything by itself.

    cargo build --release --bin liverec && python3 load-tests/loop-demo.py
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

PORT = 18089
BASE = f"http://127.0.0.1:{PORT}"
BIN = os.path.join(os.path.dirname(__file__), "..", "target", "release", "liverec")
DURATION, SHIFT_AT, FIRST_RETRAIN_AT = 150, 70, 20


def http(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    if data is not None:
        request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
        return json.loads(text) if text.startswith(("{", "[")) else text


def model_stage(metrics_text):
    """Cumulative bucket counts of liverec_stage_seconds{stage="model"}."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith('liverec_stage_seconds_bucket{stage="model"'):
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.split()[-1])))
    return buckets


def quantiles(before, after, qs=(0.5, 0.99)):
    deltas = [(b, a - c) for (b, a), (_, c) in zip(after, before)]
    total = deltas[-1][1] if deltas else 0
    out = {"requests": int(total)}
    for q in qs:
        out[f"p{int(q * 100)}_ms"] = next((b * 1000 for b, n in deltas if n >= q * total), None) if total else None
    return out


def main():
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release --bin liverec")
    registry = tempfile.mkdtemp(prefix="liverec-loop-demo-")
    env = dict(os.environ, LIVEREC_MODEL__REGISTRY_DIR=registry, LIVEREC_LISTEN=f"127.0.0.1:{PORT}",
               LIVEREC_LOG__LEVEL="warn")
    server = subprocess.Popen([BIN, "serve", "--config", "config/loop-demo.toml"], env=env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                http("GET", "/healthz")
                break
            except OSError:
                if time.time() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        start = time.time()
        sim = subprocess.Popen([BIN, "simulate", "--target", BASE, "--duration", str(DURATION), "--shift-at",
                                str(SHIFT_AT), "--rate", "300", "--workers", "8", "--bucket", "5"],
                               stdout=subprocess.PIPE)
        while time.time() - start < FIRST_RETRAIN_AT:
            time.sleep(0.5)
        idle_before = model_stage(http("GET", "/metrics"))
        time.sleep(5)
        idle_after = model_stage(http("GET", "/metrics"))
        print("retrain:", http("POST", "/v1/admin/retrain", {"reason": "first version"}))
        training_before = model_stage(http("GET", "/metrics"))
        while http("GET", "/v1/admin/models")["state"] in ("training", "waiting_for_data"):
            time.sleep(0.2)
        training_after = model_stage(http("GET", "/metrics"))
        report = json.loads(sim.communicate()[0])
        models = http("GET", "/v1/admin/models")
        start_ms = start * 1000
        print("\nhistory (seconds after the simulator started):")
        for step in reversed(models["history"]):
            print(f"  {(step['at_ms'] - start_ms) / 1000:7.1f}  {step['step']:<17} {step.get('detail', '')}")
        print("\nruns:")
        for run in reversed(models["runs"]):
            print(f"  run {run['run']}: {run['outcome']}, {run.get('seconds') or 0:.1f} s training, "
                  f"NDCG@10 {run.get('candidate_ndcg10')} vs {run.get('incumbent_ndcg10')}, {run.get('events')} events")
        print("\nsimulated CTR per 5 s bucket (taste shift at %d s):" % SHIFT_AT)
        print("  " + " ".join(f"{b['start_secs']:.0f}:{b['ctr']:.2f}" for b in report["buckets"]))
        print("\nmodel stage (a session waiting for its list), no training:", quantiles(idle_before, idle_after))
        print("model stage while the first version trained:", quantiles(training_before, training_after))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
