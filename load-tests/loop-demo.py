#!/usr/bin/env python3
"""The closed loop end to end on this machine, with timings.

Starts `liverec serve --config config/loop-demo.toml` (release build, empty temporary registry,
loopback only), runs `liverec simulate` against it with a taste shift, asks for a first version
after 20 s, and reports: the loop's history with times relative to the start, the simulated CTR
per bucket, and the model-stage latency (time a session waits for its scoring) while no training
runs and while one does. Stops everything by itself.

    cargo build --release --bin liverec && python3 load-tests/loop-demo.py

(LIVEREC_BIN=PATH runs another build, e.g. a debug one: slower, the same steps.)

It talks to the server through the Python client (clients/python); when `liverec_client` is not
importable, the first run installs it (and httpx, from PyPI) into clients/python/.venv and
re-runs itself there.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_DIR = ROOT / "clients" / "python"
PORT = 18089
BASE = f"http://127.0.0.1:{PORT}"
BIN = os.environ.get("LIVEREC_BIN") or os.path.join(os.path.dirname(__file__), "..", "target", "release", "liverec")
DURATION, SHIFT_AT, FIRST_RETRAIN_AT = 150, 70, 20


def ensure_client():
    """Imports the Python client, installing it into clients/python/.venv on the first run."""
    try:
        import liverec_client  # noqa: F401

        return
    except ImportError:
        pass
    if os.environ.get("LIVEREC_LOOP_DEMO_VENV"):
        sys.exit(f"cannot import liverec_client in {sys.executable}")
    venv = CLIENT_DIR / ".venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import liverec_client"], capture_output=True).returncode != 0:
        print(f"installing the Python client into {venv}", file=sys.stderr)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-c", str(CLIENT_DIR / "constraints.txt"), str(CLIENT_DIR)], check=True)
    os.execve(str(python), [str(python), __file__, *sys.argv[1:]], dict(os.environ, LIVEREC_LOOP_DEMO_VENV="1"))


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
    ensure_client()
    import httpx
    from liverec_client import Client, LiverecError

    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release --bin liverec")
    registry = tempfile.mkdtemp(prefix="liverec-loop-demo-")
    env = dict(os.environ, LIVEREC_MODEL__REGISTRY_DIR=registry, LIVEREC_LISTEN=f"127.0.0.1:{PORT}",
               LIVEREC_LOG__LEVEL="warn")
    server = subprocess.Popen([BIN, "serve", "--config", "config/loop-demo.toml"], env=env)
    client = Client(BASE)
    try:
        deadline = time.time() + 30
        while True:
            try:
                client.health()
                break
            except (OSError, httpx.HTTPError, LiverecError):
                if time.time() > deadline:
                    sys.exit("the server did not start")
                time.sleep(0.2)
        start = time.time()
        sim = subprocess.Popen([BIN, "simulate", "--target", BASE, "--duration", str(DURATION), "--shift-at",
                                str(SHIFT_AT), "--rate", "300", "--workers", "8", "--bucket", "5"],
                               stdout=subprocess.PIPE)
        while time.time() - start < FIRST_RETRAIN_AT:
            time.sleep(0.5)
        idle_before = model_stage(client.metrics())
        time.sleep(5)
        idle_after = model_stage(client.metrics())
        run = client.retrain(reason="first version")
        print("retrain:", {"run": run.run, "coalesced": run.coalesced})
        training_before = model_stage(client.metrics())
        while client.models().state in ("training", "waiting_for_data"):
            time.sleep(0.2)
        training_after = model_stage(client.metrics())
        report = json.loads(sim.communicate()[0])
        models = client.models()
        start_ms = start * 1000
        print("\nhistory (seconds after the simulator started):")
        for step in reversed(models.history):
            print(f"  {(step['at_ms'] - start_ms) / 1000:7.1f}  {step['step']:<17} {step.get('detail', '')}")
        print("\nruns:")
        for run in reversed(models.runs):
            print(f"  run {run['run']}: {run['outcome']}, {run.get('seconds') or 0:.1f} s training, "
                  f"NDCG@10 {run.get('candidate_ndcg10')} vs {run.get('incumbent_ndcg10')}, {run.get('events')} events")
        print("\nsimulated CTR per 5 s bucket (taste shift at %d s):" % SHIFT_AT)
        print("  " + " ".join(f"{b['start_secs']:.0f}:{b['ctr']:.2f}" for b in report["buckets"]))
        print("\nmodel stage (a session waiting for its list), no training:", quantiles(idle_before, idle_after))
        print("model stage while the first version trained:", quantiles(training_before, training_after))
    finally:
        client.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
