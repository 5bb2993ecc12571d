#!/usr/bin/env python3
"""Slow-body attack (issue 12, case 3), as one command.

Starts an embedded liverec (or uses --target), then opens --waves x --conns connections that each
send a request head declaring a body (`content-length: 1000`) and never send it, while a prober
asks `/healthz` every 100 ms on a fresh connection. Reports how long the slowest health check took,
how many attack connections the server refused or closed, and how many were still open
--hold seconds after the last wave. Passes when every health check answered within --health-limit
seconds and no attack connection outlived the server's body timeout by much (none still open).

    python3 load-tests/adversarial/slow_body.py --bin target/debug/liverec

Only 127.0.0.1 is contacted; it stops by itself. Standard library only. Needs a file-descriptor
limit above the connections it opens (`ulimit -n`).
"""

import argparse
import asyncio
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def health(host, port, samples, stop):
    while not stop.is_set():
        started = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            connected = time.monotonic() - started
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            samples.append((time.monotonic() - started, line.startswith(b"HTTP/1.1 200"), connected))
        except (OSError, asyncio.TimeoutError):
            samples.append((time.monotonic() - started, False, None))
        await asyncio.sleep(0.1)


async def attacker(host, port, held, gate):
    try:
        async with gate:
            reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return "refused"
    writer.write(b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 b"content-length: 1000\r\n\r\n")
    try:
        await writer.drain()
    except OSError:
        return "closed"
    held.append((reader, writer))
    return "open"


async def still_open(held):
    """Connections the server has not closed: a read that neither returns EOF nor data at once."""
    open_now = 0
    for reader, _ in held:
        if reader.at_eof():
            continue
        try:
            data = await asyncio.wait_for(reader.read(1), 0.01)
            if data == b"":
                continue
            # The server answered (e.g. 408) and is about to close: count it as answered.
            continue
        except asyncio.TimeoutError:
            open_now += 1
        except OSError:
            continue
    return open_now


async def run(args, host, port):
    samples, stop = [], asyncio.Event()
    prober = asyncio.create_task(health(host, port, samples, stop))
    held, outcomes = [], {"open": 0, "refused": 0, "closed": 0}
    gate = asyncio.Semaphore(args.connect_concurrency)
    for wave in range(args.waves):
        results = await asyncio.gather(*(attacker(host, port, held, gate) for _ in range(args.conns)))
        for r in results:
            outcomes[r] += 1
        print(f"wave {wave + 1}: {results.count('open')} connections holding a body back", flush=True)
    await asyncio.sleep(args.hold)
    remaining = await still_open(held)
    stop.set()
    await prober
    for _, writer in held:
        writer.close()
    worst = max(s[0] for s in samples)
    failed = sum(1 for s in samples if not s[1])
    slow = sorted(samples, key=lambda s: s[0], reverse=True)[:5]
    print(f"health checks: {len(samples)}, failed {failed}, slowest {worst:.2f} s (five slowest, "
          f"total/connect: {', '.join(f'{t:.2f}/{c:.2f}' if c is not None else f'{t:.2f}/-' for t, _, c in slow)})")
    print(f"attack connections: {outcomes}; still open {args.hold} s after the last wave: {remaining}")
    ok = failed == 0 and worst <= args.health_limit and remaining == 0
    print("PASS" if ok else "FAIL")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default="target/release/liverec")
    parser.add_argument("--target", help="host:port of a running server instead of starting one")
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--conns", type=int, default=5000, help="connections per wave")
    parser.add_argument("--connect-concurrency", type=int, default=256,
                        help="connection attempts in flight at once; thousands at once are a SYN flood, "
                             "which the kernel's listen queue (net.core.somaxconn, server.backlog) "
                             "absorbs or drops whatever the server does")
    parser.add_argument("--hold", type=float, default=30, help="seconds to wait after the last wave")
    parser.add_argument("--health-limit", type=float, default=2.0, help="slowest acceptable /healthz, seconds")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.waves * args.conns + 100 > hard:
        sys.exit(f"the file-descriptor limit ({hard}) is below {args.waves * args.conns + 100}: lower --conns")
    server = None
    if args.target:
        host, port = args.target.rsplit(":", 1)
        port = int(port)
    else:
        host, port = "127.0.0.1", free_port()
        log = open(os.path.join(tempfile.mkdtemp(prefix="liverec-slow-body-"), "server.log"), "w")
        server = subprocess.Popen([os.path.abspath(args.bin), "serve", "--listen", f"{host}:{port}"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir(),
                                  env=dict(os.environ, LIVEREC_LOG__LEVEL="warn"))
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection((host, port), 1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    sys.exit(f"the server did not start; see {log.name}")
                time.sleep(0.2)
    try:
        ok = asyncio.run(run(args, host, port))
    finally:
        if server:
            server.terminate()
            server.wait(30)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
