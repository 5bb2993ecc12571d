#!/usr/bin/env python3
"""Scale-out of production mode, measured (issue 13 item 5): 1, 2 and 3 instances in one consumer
group, and what a rebalance costs under load. Loopback only; stops by itself.

Needs the services (`eval "$(scripts/services up)"`: LIVEREC_TEST_KAFKA_BROKERS,
LIVEREC_TEST_REDIS_URL; LIVEREC_SERVICES_DIR, if set, finds the Kafka and Redis pids for their
CPU), the release binaries and kcat.

throughput (`--part throughput`): for k = 1, 2, 3, k instances in a fresh consumer group on a
fresh topic of `--partitions` partitions (and a fresh Redis key prefix: every run applies the same
events to empty profiles); once the group has settled, the topic is filled with a backlog of
`--backlog` events (kcat, murmur2 as the server's producer, `--users` users) that they drain. Over a window of `--window` seconds, starting once the
group has settled, the script reports the aggregate applied events/s and each instance's, and
the CPU seconds per event of each liverec process, of Kafka and of Redis (utime + stime from
/proc/PID/stat), and how busy the whole machine was (/proc/stat, /proc/loadavg). A backlog is a
producer faster than any consumer, without a producer competing for the cores during the window.

rebalance (`--part rebalance`): two instances in a group on a fresh topic; `liverec-load` runs
load-tests/scenarios/kafka-ingest.toml at `--rate` events/s with its WebSocket subscribers on the
first instance. At load t = 20 s a third instance starts (join), at t = 45 s the second gets
SIGTERM (leave) and, with `--kill`, at t = 70 s the third gets SIGKILL (the group then waits for
`kafka.session_timeout_ms`, LIVEREC_KAFKA__SESSION_TIMEOUT_MS, before it rebalances). For each:
the rebalance time, from the join or leave to the moment every partition is assigned to exactly
one live instance (the instances' "partitions revoked"/"partitions assigned" log lines), and to
the moment every instance applies events again (its liverec_session_applied_events_total,
sampled every 100 ms); the event-to-push p99 of the seconds around it (the load tool's
timeline); and, after the load, whether every event produced is in Redis exactly once and in
order (each user's history, decoded as liverec::store::redis::decode_history_entry does).

    eval "$(scripts/services up)"
    python3 load-tests/scale-out.py --out reports/scale-out
    python3 load-tests/scale-out.py --part rebalance --kill --rate 1500

Redis is switched to `appendfsync everysec` (the production figure's setting; scripts/services
starts it with `always`) for the run and switched back at the end.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime

HOST = "127.0.0.1"
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- small clients


class Redis:
    """Just enough RESP for pipelined commands (no client library needed)."""

    def __init__(self, url):
        match = re.match(r"redis://([^:/]+):(\d+)", url)
        if not match or match.group(1) not in ("127.0.0.1", "localhost"):
            sys.exit(f"a loopback redis:// URL is needed, not {url}")
        self.sock = socket.create_connection((match.group(1), int(match.group(2))), timeout=30)
        self.buf = b""

    def pipeline(self, commands):
        out = bytearray()
        for args in commands:
            out += b"*%d\r\n" % len(args)
            for arg in args:
                arg = arg if isinstance(arg, bytes) else str(arg).encode()
                out += b"$%d\r\n%s\r\n" % (len(arg), arg)
        self.sock.sendall(out)
        return [self._reply() for _ in commands]

    def command(self, *args):
        return self.pipeline([args])[0]

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RuntimeError(f"unexpected redis reply {line[:40]!r}")


def history_event_id(entry):
    """The event id of one stored interaction: the binary form of src/store/codec.rs
    (version 1, flags, zigzag varint timestamp, item id, event id) or the older JSON form."""
    if entry[:1] == b"{":
        return json.loads(entry)["event_id"]
    pos = 2

    def varint():
        nonlocal pos
        n, shift = 0, 0
        while True:
            b = entry[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7

    if entry[0] != 1:
        raise ValueError(f"unknown history entry version {entry[0]}")
    flags = entry[1]
    varint()  # timestamp
    pos += varint()  # item id
    if flags & (1 << 6):  # a UUID event id, 16 bytes
        return entry[pos : pos + 16].hex()
    n = varint()
    return entry[pos : pos + n].decode()


def http_get(port, path, timeout=5):
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:  # /readyz answers 503 with a body when degraded
        return error.code, error.read()


def scrape(port):
    _, text = http_get(port, "/metrics")
    values = {}
    for line in text.decode().splitlines():
        match = re.match(r"^(liverec_[a-z_]+) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def cpu_secs(pid):
    """utime + stime of a process, in seconds (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def machine_ticks():
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def log_time(stamp):
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------- instances


class Instance:
    """One `liverec serve` in production mode, JSON logs in a file of its own."""

    def __init__(self, name, args, env, topic, group, prefix, outdir):
        self.name = name
        self.port = free_port()
        self.log_path = os.path.join(outdir, f"{name}.log")
        env = dict(env)
        env.update(
            {
                "LIVEREC_BUS__KIND": "kafka",
                "LIVEREC_STORE__KIND": "redis",
                "LIVEREC_KAFKA__BROKERS": args.brokers,
                "LIVEREC_KAFKA__EVENTS_TOPIC": topic,
                "LIVEREC_KAFKA__DEAD_LETTER_TOPIC": f"{topic}.dlq",
                "LIVEREC_KAFKA__GROUP_ID": group,
                "LIVEREC_KAFKA__PARTITIONS": str(args.partitions),
                "LIVEREC_REDIS__URL": args.redis_url,
                "LIVEREC_REDIS__KEY_PREFIX": prefix,
                "LIVEREC_LOG__FORMAT": "json",
                "LIVEREC_LOG__LEVEL": "info",
            }
        )
        self.log = open(self.log_path, "w")
        self.started_at = time.time()
        self.proc = subprocess.Popen(
            [args.bin, "serve", "--listen", f"{HOST}:{self.port}"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.proc.pid
        self.stopped_at = None
        self.exited_at = None

    def alive(self):
        return self.proc.poll() is None

    def wait_healthy(self, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            if not self.alive():
                sys.exit(f"{self.name} exited during start-up; see {self.log_path}")
            try:
                if http_get(self.port, "/healthz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        sys.exit(f"{self.name} did not answer /healthz within {timeout} s; see {self.log_path}")

    def signal(self, sig):
        """Sends `sig` now; `exited_at` notes when the process is gone."""
        self.stopped_at = time.time()
        if self.alive():
            os.kill(self.pid, sig)

            def watch():
                self.proc.wait()
                self.exited_at = time.time()

            threading.Thread(target=watch, daemon=True).start()

    def dump_stacks(self, path):
        """Every thread's stack (gdb), for a consumer that does not take part in a rebalance."""
        if not shutil.which("gdb") or not self.alive():
            return None
        with open(path, "w") as out:
            subprocess.run(["gdb", "-p", str(self.pid), "-batch", "-ex", "thread apply all bt 40"],
                           stdout=out, stderr=subprocess.STDOUT, timeout=120)
        return path

    def stop(self, grace=30):
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def rebalance_log(self):
        """(time, kind, partitions, fields) of the consumer's start, revocations and assignments."""
        events = []
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if not line.startswith("{"):
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                fields = record.get("fields", {})
                message = fields.get("message", "")
                if message.startswith("partitions revoked"):
                    kind = "revoked"
                elif message == "partitions assigned":
                    kind = "assigned"
                elif message == "kafka consumer started":
                    kind = "started"
                else:
                    continue
                parts = partition_set(fields.get("partitions", ""))
                events.append((log_time(record["timestamp"]), kind, parts, fields))
        return events


def partition_set(text):
    return {int(p) for p in re.findall(r"-?\d+", str(text))}


def owned_after(owned, kind, parts, fields):
    """The partitions an instance owns after one of its log lines. Each line names them (`owned`)
    since the cooperative assignment came; an older release's lines named only the partitions
    assigned (its whole share, with the eager assignment) or revoked (all of them)."""
    if "owned" in fields:
        return partition_set(fields["owned"])
    if kind == "assigned":
        return parts
    if kind == "revoked":
        return set()
    return owned


class Sampler(threading.Thread):
    """Samples every live instance's applied-events counter every `interval` seconds."""

    def __init__(self, instances, interval=0.1):
        super().__init__(daemon=True)
        self.instances = instances
        self.interval = interval
        self.samples = {}  # name -> [(time, applied)]
        self.running = True

    def run(self):
        while self.running:
            for instance in list(self.instances):
                if not instance.alive() or instance.stopped_at:
                    continue
                try:
                    applied = scrape(instance.port).get("liverec_session_applied_events_total")
                except OSError:
                    continue
                if applied is not None:
                    self.samples.setdefault(instance.name, []).append((time.time(), applied))
            time.sleep(self.interval)


def settled_assignment(instances, partitions, since=0.0):
    """Each live instance's current partitions from its log, if every partition is assigned to
    exactly one of them and each has at least one (else None)."""
    current = {}
    for instance in instances:
        owned = set()
        for t, kind, parts, fields in instance.rebalance_log():
            owned = owned_after(owned, kind, parts, fields)
        current[instance.name] = owned
    union = set().union(*current.values())
    disjoint = sum(len(p) for p in current.values()) == len(union)
    enough = all(current.values()) or len(instances) > partitions
    return current if union == set(range(partitions)) and disjoint and enough else None


def wait_settled(instances, partitions, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if settled_assignment(instances, partitions):
            return
        time.sleep(0.2)
    sys.exit(f"the group did not settle within {timeout} s: see the instances' logs")


# ---------------------------------------------------------------- shared steps


def create_topic(args, topic):
    out = subprocess.run(
        [os.path.join(ROOT, "scripts", "services"), "create-topic", topic, str(args.partitions)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        sys.exit(f"create-topic {topic} failed: {out.stderr[-500:]}")


def process_table(pids):
    """CPU seconds of each named pid now."""
    return {name: cpu_secs(pid) for name, pid in pids.items() if pid}


def say(text=""):
    print(text, flush=True)


# ---------------------------------------------------------------- throughput


def fill_backlog(args, topic, run):
    """`args.backlog` events on `args.users` users into `topic`, through kcat."""
    started = time.time()
    kcat = subprocess.Popen(
        [
            "kcat", "-P", "-b", args.brokers, "-t", topic, "-K", "\t",
            "-X", "partitioner=murmur2_random", "-X", "linger.ms=20", "-X", "compression.codec=lz4",
            "-X", "queue.buffering.max.messages=1000000",
        ],
        stdin=subprocess.PIPE,
    )
    per_user = [0] * args.users
    chunk = []
    for n in range(args.backlog):
        user = (n * 7919) % args.users
        seq = per_user[user]
        per_user[user] += 1
        chunk.append(
            f'load-user-{user}\t{{"user_id":"load-user-{user}","item_id":"item-{(n * 31) % 500:04d}",'
            f'"event_type":"view","event_id":"so{run}-{user}-{seq}"}}\n'
        )
        if len(chunk) == 10000:
            kcat.stdin.write("".join(chunk).encode())
            chunk = []
    kcat.stdin.write("".join(chunk).encode())
    kcat.stdin.close()
    if kcat.wait() != 0:
        sys.exit("kcat failed to produce the backlog")
    say(f"backlog: {args.backlog} events on {args.users} users in {topic} ({time.time() - started:.1f} s)")


def throughput_run(args, env, run, k, outdir, service_pids):
    group = topic = f"scale-{run}-k{k}"
    create_topic(args, topic)
    instances = [Instance(f"k{k}-{i + 1}", args, env, topic, group, group, outdir) for i in range(k)]
    try:
        for instance in instances:
            instance.wait_healthy()
        # The group settles on the empty topic first: the window measures consumption, not a
        # rebalance under load (that is the other part).
        wait_settled(instances, args.partitions)
        fill_backlog(args, topic, f"{run}k{k}")
        time.sleep(args.warmup)
        pids = {i.name: i.pid for i in instances}
        pids.update(service_pids)

        def snapshot():
            return (
                time.time(),
                {i.name: scrape(i.port).get("liverec_session_applied_events_total", 0.0) for i in instances},
                process_table(pids),
                machine_ticks(),
            )

        load_start = loadavg()
        first = snapshot()
        drained_at = None
        last = first
        while time.time() - first[0] < args.window:
            time.sleep(1)
            last = snapshot()
            if sum(last[1].values()) >= 0.98 * args.backlog:
                drained_at = last[0]
                break
        load_end = loadavg()
        if not settled_assignment(instances, args.partitions):
            say("  warning: the group rebalanced during the window")
    finally:
        for instance in instances:
            instance.stop()
    secs = last[0] - first[0]
    applied = {name: last[1][name] - first[1][name] for name in first[1]}
    total = sum(applied.values())
    cpu = {name: (last[2].get(name) or 0) - (first[2].get(name) or 0) for name in first[2]}
    busy = (last[3][0] - first[3][0]) / (last[3][1] - first[3][1]) * os.cpu_count()
    ours = sum(cpu.values()) / secs
    row = {
        "instances": k,
        "window_secs": round(secs, 1),
        "drained_early": drained_at is not None,
        "applied_events_per_s": round(total / secs),
        "per_instance_events_per_s": {name: round(v / secs) for name, v in applied.items()},
        "cpu_us_per_event": {name: round(c / max(total if name in service_pids else applied[name], 1) * 1e6, 1)
                             for name, c in cpu.items()},
        "cores": {name: round(c / secs, 2) for name, c in cpu.items()},
        "cores_liverec_kafka_redis": round(ours, 2),
        "events_per_s_per_core_used": round(total / secs / ours) if ours else None,
        "machine_busy_cores": round(busy, 2),
        "other_processes_cores": round(max(busy - ours, 0.0), 2),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
    }
    say(
        f"k={k}: {row['applied_events_per_s']} events/s applied over {row['window_secs']} s "
        f"(per instance {row['per_instance_events_per_s']}); cores {row['cores']}; "
        f"CPU us/event {row['cpu_us_per_event']}; machine busy {row['machine_busy_cores']} of "
        f"{os.cpu_count()} cores, others {row['other_processes_cores']}; load {load_start} -> {load_end}"
    )
    return row


def part_throughput(args, env, run, outdir, service_pids):
    rows = [throughput_run(args, env, run, k, outdir, service_pids) for k in args.instances]
    say()
    say("| instances | applied events/s | per instance | liverec cores (each) | Kafka cores | Redis cores | "
        "CPU us/event liverec (each) | Kafka us/event | Redis us/event | events/s per core used | "
        "machine busy / others (cores) | load 1/5/15 |")
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        names = list(r["per_instance_events_per_s"])
        each = " / ".join(f"{r['per_instance_events_per_s'][n]:,}" for n in names)
        cores = " / ".join(str(r["cores"][n]) for n in names)
        us = " / ".join(str(r["cpu_us_per_event"][n]) for n in names)
        per_core = r["events_per_s_per_core_used"]
        say(
            f"| {r['instances']} | {r['applied_events_per_s']:,} | {each} | {cores} | "
            f"{r['cores'].get('kafka', '-')} | {r['cores'].get('redis', '-')} | {us} | "
            f"{r['cpu_us_per_event'].get('kafka', '-')} | {r['cpu_us_per_event'].get('redis', '-')} | "
            f"{per_core:,} | {r['machine_busy_cores']} / {r['other_processes_cores']} | "
            f"{r['loadavg_start']} -> {r['loadavg_end']} |"
        )
    return rows


# ---------------------------------------------------------------- rebalance


class LoadTool(threading.Thread):
    """liverec-load in the background; notes when each progress line ("t=  20 s") arrived, which
    anchors the load's seconds to the wall clock."""

    def __init__(self, cmd, log_path):
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log = open(log_path, "w")
        self.start_wall = None
        self.seen = 0

    def run(self):
        for line in self.proc.stdout:
            now = time.time()
            self.log.write(line)
            self.log.flush()
            match = re.match(r"t=\s*(\d+) s", line)
            if match:
                t = int(match.group(1))
                self.seen = t
                # The line is printed on the first tick at or after t: the earliest anchor wins.
                start = now - t
                self.start_wall = start if self.start_wall is None else min(self.start_wall, start)
        self.log.close()

    def wait_for(self, t):
        while self.seen < t:
            if self.proc.poll() is not None and self.seen < t:
                sys.exit("liverec-load ended early; see its log")
            time.sleep(0.05)


def measure_rebalance(what, t0, members, leaving, sampler, partitions):
    """When, after t0, every partition was assigned to exactly one of `members` (each having
    been assigned after t0), and when each of them applied events again."""
    logs = {m.name: m.rebalance_log() for m in members}
    timeline = sorted(
        (t, name, kind, parts, fields) for name, log in logs.items() for (t, kind, parts, fields) in log
    )
    owned = {m.name: set() for m in members}
    fresh = set()
    assigned_at = {}
    settled = None
    revokes = []
    named = False
    for t, name, kind, parts, fields in timeline:
        owned[name] = owned_after(owned[name], kind, parts, fields)
        named = named or "owned" in fields
        if kind == "assigned" and t > t0:
            fresh.add(name)
            assigned_at[name] = t
        elif kind == "revoked" and t > t0:
            revokes.append(int(fields.get("waited_ms", 0)))
        if t <= t0:
            continue
        union = set().union(*owned.values())
        # With `owned` named, each member must own some partitions (with a cooperative assignment
        # one that keeps its share hears nothing); without, each must have been assigned afresh.
        everyone = (all(owned.values()) or len(owned) > partitions) if named else fresh == set(owned)
        if everyone and union == set(range(partitions)) and sum(len(p) for p in owned.values()) == len(union):
            settled = t
            break
    started = None
    for m in members:
        for t, kind, _, _ in logs[m.name]:
            if kind == "started" and t > t0 - 1:
                started = t
    consuming = None
    if settled:
        consuming = settled
        for m in members:
            samples = sampler.samples.get(m.name, [])
            at = assigned_at.get(m.name, settled)
            before = [a for t, a in samples if t <= at]
            base = before[-1] if before else 0.0
            after = [t for t, a in samples if t > at and a > base]
            consuming = max(consuming, after[0]) if after else None
            if consuming is None:
                break
    # The longest stretch in which no instance applied anything, around the event.
    gap = 0.0
    points = sorted((t, name, a) for name, s in sampler.samples.items() for t, a in s if t0 - 2 <= t <= t0 + 30)
    last_total_change, last_values, total_prev = None, {}, None
    for t, name, a in points:
        last_values[name] = a
        total = sum(last_values.values())
        if total_prev is None or total != total_prev:
            if last_total_change is not None and t0 - 0.5 <= t:
                gap = max(gap, t - last_total_change)
            last_total_change, total_prev = t, total
    result = {
        "what": what,
        "at_unix": round(t0, 3),
        "consumer_started_after_s": round(started - t0, 2) if started and what == "join" else None,
        "all_partitions_assigned_after_s": round(settled - t0, 2) if settled else None,
        "from_consumer_start_s": round(settled - started, 2) if settled and started and what == "join" else None,
        "all_consuming_after_s": round(consuming - t0, 2) if consuming else None,
        "revoke_waits_ms": revokes,
        "longest_no_progress_s": round(gap, 2),
        "assignment": {name: sorted(p) for name, p in owned.items()},
        "leaving_exited_after_s": round(leaving.exited_at - t0, 2) if leaving and leaving.exited_at else None,
    }
    return result


def stored_exactly_once(args, prefix, report):
    """Every event the load tool produced is in its user's Redis history once, in order."""
    sent = report["events_sent"] - report["errors_by_kind"].get("kafka_produce", 0)
    redis = Redis(args.redis_url)
    deadline, last_total, moved = None, -1, time.time()
    while True:
        total, doubled, gaps, disorder, users = 0, 0, 0, 0, 0
        for start in range(0, args.users, 1000):
            keys = [f"{prefix}:{{load-user-{u}}}:h" for u in range(start, min(args.users, start + 1000))]
            for entries in redis.pipeline([("LRANGE", key, 0, -1) for key in keys]):
                if not entries:
                    continue
                users += 1
                seqs = [int(history_event_id(e).rsplit("-", 1)[1]) for e in entries]
                total += len(seqs)
                doubled += len(seqs) - len(set(seqs))
                gaps += (max(seqs) + 1) - len(set(seqs))
                disorder += sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
        if total >= sent or time.time() - moved > args.settle_stall:
            break
        if total != last_total:
            last_total, moved = total, time.time()
        time.sleep(1)
    return {
        "events_produced": sent,
        "events_stored": total,
        "users": users,
        "doubled": doubled,
        "missing_inside_a_user_sequence": gaps,
        "out_of_order": disorder,
        "exactly_once": total == sent and doubled == 0 and gaps == 0,
    }


def timeline_around(report, load_start, t0, t_end, before=3, after=5):
    rows = []
    first = int(t0 - load_start) - before
    last = int((t_end or t0) - load_start) + after
    for second in report["timeline"]:
        if first <= second["t"] <= last:
            rows.append((second["t"], second["event_to_push_p99_ms"], second["pushes"], second.get("server_applied_events")))
    worst = max((r[1] for r in rows if r[1] is not None), default=None)
    return rows, worst


def part_rebalance(args, env, run, outdir, service_pids):
    topic = f"scale-{run}-rebalance"
    group = prefix = f"scale-{run}-rb"
    create_topic(args, topic)
    members = [Instance(n, args, env, topic, group, prefix, outdir) for n in ("rb-A", "rb-B")]
    live = list(members)
    sampler = Sampler(live)
    load = None
    try:
        for m in members:
            m.wait_healthy()
        wait_settled(members, args.partitions)
        sampler.start()
        duration = 95 if args.kill else 70
        report_dir = os.path.join(outdir, "rebalance-load")
        cmd = [
            args.load_bin, "--target", f"http://{HOST}:{members[0].port}",
            "--scenario", os.path.join(ROOT, "load-tests", "scenarios", "kafka-ingest.toml"),
            "--out", report_dir, "--server-pid", str(members[0].pid),
            "--set", f'kafka.brokers="{args.brokers}"', "--set", f'kafka.topic="{topic}"',
            "--set", f"events_per_s={args.rate}", "--set", f"duration_secs={duration}",
            "--set", f"users={args.users}", "--set", "settle_secs=60",
        ]
        per_user = args.rate * duration / args.users
        if per_user > 45:
            sys.exit(f"{per_user:.0f} events per user would overrun session.history_len (50): raise --users")
        load = LoadTool(cmd, os.path.join(outdir, "rebalance-load.log"))
        load.start()
        say(f"rebalance: {args.rate} events/s for {duration} s, subscribers on rb-A, load {loadavg()}")
        events = []

        load.wait_for(20)
        joiner = Instance("rb-C", args, env, topic, group, prefix, outdir)
        t_join = joiner.started_at
        live.append(joiner)
        members.append(joiner)
        say(f"  join: rb-C started at load t={t_join - load.start_wall:.1f} s")

        load.wait_for(45)
        t_leave = time.time()
        members[1].signal(signal.SIGTERM)
        say(f"  leave: SIGTERM to rb-B at load t={t_leave - load.start_wall:.1f} s")

        t_kill = None
        if args.kill:
            load.wait_for(70)
            t_kill = time.time()
            joiner.signal(signal.SIGKILL)
            say(f"  kill: SIGKILL to rb-C at load t={t_kill - load.start_wall:.1f} s")

        load.proc.wait()
        load.join()
        sampler.running = False
        uptime_end = loadavg()
        with open(os.path.join(report_dir, "report.json")) as f:
            report = json.load(f)

        a, b, c = members
        events.append(measure_rebalance("join", t_join, [a, b, c], None, sampler, args.partitions))
        events.append(measure_rebalance("leave (SIGTERM)", t_leave, [a, c], b, sampler, args.partitions))
        if t_kill:
            events.append(measure_rebalance("SIGKILL", t_kill, [a], c, sampler, args.partitions))
        for e in events:
            if e["all_partitions_assigned_after_s"] is None:
                for m in members:
                    path = m.dump_stacks(os.path.join(outdir, f"{m.name}-stacks.txt"))
                    if path:
                        say(f"  {e['what']} did not settle: {m.name}'s threads in {path}")
                break
        exact = stored_exactly_once(args, prefix, report)
    finally:
        sampler.running = False
        if load and load.proc.poll() is None:
            load.proc.terminate()
        for m in members:
            m.stop()

    baseline = [s["event_to_push_p99_ms"] for s in report["timeline"] if 5 <= s["t"] < 18 and s["event_to_push_p99_ms"]]
    say()
    say(
        f"load: {report['events_sent']} events at {report['events_per_s']:.0f}/s, event-to-push p50/p99/p99.9 "
        f"{report['event_to_push_ms']['p50']:.1f}/{report['event_to_push_ms']['p99']:.1f}/"
        f"{report['event_to_push_ms']['p999']:.1f} ms over the whole run, pushes {report['pushes_received']} "
        f"received, {report['pushes_dropped']} dropped, {report['errors']} errors; per-second p99 before the "
        f"join (t 5-17 s): median {statistics.median(baseline) if baseline else float('nan'):.1f} ms; load "
        f"{report['host']['loadavg_start']} -> {uptime_end}"
    )
    say()
    say("| event | consumer joined after | all partitions assigned after | all consuming after | "
        "revoke waits (ms) | longest stretch with nothing applied | worst per-second event-to-push p99 around it | "
        "leaving process exited after |")
    say("|---|---|---|---|---|---|---|---|")
    for e in events:
        end = e["at_unix"] + (e["all_consuming_after_s"] or e["all_partitions_assigned_after_s"] or 0)
        rows, worst = timeline_around(report, load.start_wall, e["at_unix"], end)
        e["timeline"] = rows
        e["worst_p99_ms"] = worst
        joined = "-" if e["consumer_started_after_s"] is None else f"{e['consumer_started_after_s']} s"
        request = "" if e["from_consumer_start_s"] is None else f" ({e['from_consumer_start_s']} s from the join request)"
        worst_text = "-" if worst is None else f"{worst:.1f} ms"
        say(
            f"| {e['what']} | {joined} | {e['all_partitions_assigned_after_s']} s{request} | "
            f"{e['all_consuming_after_s']} s | {e['revoke_waits_ms']} | {e['longest_no_progress_s']} s | {worst_text} | "
            f"{'-' if e['leaving_exited_after_s'] is None else str(e['leaving_exited_after_s']) + ' s'} |"
        )
    for e in events:
        say(f"  {e['what']}: per second (t, p99 ms, pushes, applied by rb-A): {e['timeline']}")
    say()
    say(
        f"exactly once: {exact['events_stored']} of {exact['events_produced']} produced events in Redis for "
        f"{exact['users']} users, {exact['doubled']} doubled, {exact['missing_inside_a_user_sequence']} missing "
        f"inside a user's sequence, {exact['out_of_order']} out of order -> "
        f"{'OK' if exact['exactly_once'] else 'FAILED'}"
    )
    return {"events": events, "exactly_once": exact, "load_report": report_dir, "baseline_p99_ms": baseline}


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "liverec"))
    parser.add_argument("--load-bin", default=os.path.join(ROOT, "target", "release", "liverec-load"))
    parser.add_argument("--part", choices=["all", "throughput", "rebalance"], default="all")
    parser.add_argument("--out", default=os.path.join(ROOT, "reports", "scale-out"))
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--instances", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3])
    parser.add_argument("--backlog", type=int, default=1_000_000, help="events in the throughput backlog")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--window", type=float, default=30, help="seconds of the throughput window")
    parser.add_argument("--warmup", type=float, default=3, help="seconds after the group settled")
    parser.add_argument("--rate", type=int, default=1500, help="events/s during the rebalances (two instances must sustain it)")
    parser.add_argument("--kill", action="store_true", help="also SIGKILL an instance under load")
    parser.add_argument("--settle-stall", type=float, default=60, help="give up on Redis after this long without progress")
    parser.add_argument("--keep-fsync", action="store_true", help="leave Redis's appendfsync as it is")
    args = parser.parse_args()
    args.bin = os.path.abspath(args.bin)
    args.load_bin = os.path.abspath(args.load_bin)
    args.brokers = os.environ.get("LIVEREC_TEST_KAFKA_BROKERS")
    args.redis_url = os.environ.get("LIVEREC_TEST_REDIS_URL")
    if not args.brokers or not args.redis_url:
        sys.exit('no services: run eval "$(scripts/services up)" first')
    for address in [args.brokers, args.redis_url]:
        if "127.0.0.1" not in address and "localhost" not in address:
            sys.exit(f"loopback only: {address}")
    if not shutil.which("kcat"):
        sys.exit("kcat is needed (scripts/services up installs it)")
    services_dir = os.environ.get("LIVEREC_SERVICES_DIR", "/tmp/liverec-services").rstrip("/")
    service_pids = {
        "kafka": read_pid(f"{services_dir}/kafka/kafka.pid"),
        "redis": read_pid(f"{services_dir}/redis/redis.pid"),
    }
    service_pids = {k: v for k, v in service_pids.items() if v and cpu_secs(v) is not None}
    run = time.strftime("%H%M%S")
    outdir = os.path.join(os.path.abspath(args.out), run)
    os.makedirs(outdir, exist_ok=True)
    env = dict(os.environ)
    redis = Redis(args.redis_url)
    fsync_before = redis.command("CONFIG", "GET", "appendfsync")[1].decode()
    if not args.keep_fsync:
        redis.command("CONFIG", "SET", "appendfsync", "everysec")
    say(f"scale-out {run}: {os.cpu_count()} cores, load {loadavg()}, Redis appendfsync "
        f"{'everysec' if not args.keep_fsync else fsync_before} (was {fsync_before}), "
        f"Kafka pid {service_pids.get('kafka')}, Redis pid {service_pids.get('redis')}, out {outdir}")
    results = {"run": run, "cores": os.cpu_count(), "bin": args.bin}
    try:
        if args.part in ("all", "throughput"):
            results["throughput"] = part_throughput(args, env, run, outdir, service_pids)
        if args.part in ("all", "rebalance"):
            results["rebalance"] = part_rebalance(args, env, run, outdir, service_pids)
    finally:
        if not args.keep_fsync:
            Redis(args.redis_url).command("CONFIG", "SET", "appendfsync", fsync_before)
        with open(os.path.join(outdir, "scale-out.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
    say(f"results: {os.path.join(outdir, 'scale-out.json')}")


if __name__ == "__main__":
    main()
