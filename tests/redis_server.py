"""A Redis for tests: the shared one on 127.0.0.1:6379 when it answers, else a private redis-server.

Fixtures (re-exported by tests/conftest.py):
  redis_base_url  session: URL of a Redis to use (no prefix)
  redis_url       per test: that URL with a unique ``?prefix=``; the test's keys are deleted afterwards

``PrivateRedis`` starts a redis-server on a free port in a temp folder; tests that stop and
restart Redis use their own, never the shared one.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

import pytest

SHARED_HOST, SHARED_PORT = "127.0.0.1", 6379
NO_REDIS = (
    "no Redis for the tests: nothing answers PING on 127.0.0.1:6379 and there is no redis-server "
    "binary on PATH to start one (install it: apt-get install redis-server)"
)


def redis_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis server answers PING at host:port (plain socket, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server process of our own on a free port (optionally persistent across restarts)."""

    def __init__(self, *, persistent: bool = False, port: Optional[int] = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip(NO_REDIS)
        self.binary = binary
        self.port = port or _free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="fd-redis-"))
        self.persistent = persistent
        self.proc: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> "PrivateRedis":
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        cmd = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
            "--dir", str(self.folder), "--daemonize", "no", "--protected-mode", "no",
        ]
        log = open(self.folder / "redis.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not redis_answers("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM: with appendonly the data survives a restart) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_base_url() -> Iterator[str]:
    """A Redis to test against: the shared 127.0.0.1:6379 if it answers, else a private one."""
    pytest.importorskip("redis", reason='the redis package is not installed: pip install "fastdeploy[redis]"')
    if redis_answers(SHARED_HOST, SHARED_PORT):
        yield f"redis://{SHARED_HOST}:{SHARED_PORT}/0"
        return
    server = PrivateRedis()
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


def delete_prefix(url: str) -> None:
    """Delete every key of the prefix in ``url``."""
    from fastdeploy.store.redis import RedisStore

    store = RedisStore(url)
    try:
        store.delete_all()
    finally:
        store.close()


@pytest.fixture
def redis_url(redis_base_url: str) -> Iterator[str]:
    """A broker URL with a prefix of its own for this test; its keys are deleted afterwards."""
    url = f"{redis_base_url}?prefix=fdtest-{uuid.uuid4().hex[:12]}"
    yield url
    try:
        delete_prefix(url)
    except Exception:  # the Redis may be gone (a test stopped its own); nothing to clean then
        pass
