"""Fixtures: real liverec servers, started from the binary ($LIVEREC_BIN, else the workspace's
target/debug/liverec) on free loopback ports, with a temporary model registry."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional, TypeVar

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")

#: How long a wait may go without progress before a test fails: a stall, not a speed limit.
STALL_SECS = float(os.environ.get("LIVEREC_TEST_STALL_SECS", "60"))


def binary() -> str:
    path = os.environ.get("LIVEREC_BIN") or str(REPO / "target" / "debug" / "liverec")
    if not os.access(path, os.X_OK):
        pytest.fail(f"no liverec binary at {path}: build it (cargo build -p liverec --bin liverec) or set LIVEREC_BIN")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], Optional[T]], stall: float = STALL_SECS, every: float = 0.05) -> T:
    """Polls ``check`` until it returns something other than None/False; fails after ``stall``
    seconds without that (a stall detector, not a speed requirement)."""
    deadline = time.monotonic() + stall
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"stalled for {stall:.0f} s waiting for {what}")
        time.sleep(every)


class Server:
    """One liverec process; ``restart()`` stops it and starts a new one on the same port."""

    def __init__(self, workdir: Path, env: Optional[Dict[str, str]] = None, config: Optional[str] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.extra_env = env or {}
        self.config_path: Optional[Path] = None
        if config is not None:
            self.config_path = workdir / "liverec.toml"
            self.config_path.write_text(config)
        self.process: Optional[subprocess.Popen] = None
        self.starts = 0

    def start(self) -> "Server":
        self.starts += 1
        # Settings of the caller's own liverec (LIVEREC_*) stay out: the test decides.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("LIVEREC_")}
        env = dict(
            inherited,
            LIVEREC_LISTEN=f"127.0.0.1:{self.port}",
            LIVEREC_MODEL__REGISTRY_DIR=str(self.workdir / "models"),
            LIVEREC_LOG__LEVEL="warn",
            **self.extra_env,
        )
        args = [binary(), "serve"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        log = open(self.workdir / f"server-{self.starts}.log", "wb")
        self.process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()

        def healthy() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"liverec exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the server to be ready", healthy)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STALL_SECS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        path = self.workdir / f"server-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture
def make_server(tmp_path_factory):
    """Starts servers for one test and stops them after it."""
    servers = []

    def make(env: Optional[Dict[str, str]] = None, config: Optional[str] = None) -> Server:
        server = Server(tmp_path_factory.mktemp("liverec"), env, config).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The embedded demo (auth off, demo catalogue), shared by the tests that do not restart it."""
    s = Server(tmp_path_factory.mktemp("liverec")).start()
    yield s
    s.stop()


def new_key(role: str) -> tuple:
    """``liverec key``: (the key, its [[auth.api_keys]] entry)."""
    out = subprocess.run([binary(), "key", "--id", role, "--role", role], capture_output=True, text=True, check=True)
    entry = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("#"))
    return out.stdout.strip(), entry


@pytest.fixture(scope="session")
def keys():
    """An API key per role, and the configuration that accepts them (auth on)."""
    made = {role: new_key(role) for role in ("admin", "producer", "reader")}
    config = '[auth]\nmode = "on"\ntoken_secret = "a test secret that is long enough to sign tokens"\n\n'
    config += "\n\n".join(entry for _, entry in made.values()) + "\n"
    return {role: key for role, (key, _) in made.items()}, config


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory, keys):
    """The embedded demo with auth on: ``keys[0]`` maps each role to an API key."""
    s = Server(tmp_path_factory.mktemp("liverec"), config=keys[1]).start()
    yield s
    s.stop()
