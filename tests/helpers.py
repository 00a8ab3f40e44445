"""Start the real `fastdeploy` CLI on a free port and talk to it over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TEST_RECIPES = Path(__file__).resolve().parent / "recipes"


def wait_until(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last value: {value!r})")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A running `fastdeploy` command (the supervisor and its children)."""

    def __init__(self, proc: subprocess.Popen, port: int, state_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.state_dir = state_dir
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def post(self, path: str, body: Any = None, *, data: Optional[bytes] = None, timeout: float = 60, **kw: Any) -> requests.Response:
        if data is not None:
            return requests.post(self.url + path, data=data, timeout=timeout, **kw)
        return requests.post(self.url + path, json=body, timeout=timeout, **kw)

    def get(self, path: str, timeout: float = 30, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=timeout, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fastdeploy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"not ready after {timeout} s:\n{self.log()}")

    def wait_result(self, unique_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.post("/result", {"unique_id": unique_id}).json()
            if body["status"] in ("done", "failed"):
                return body
            time.sleep(0.05)
        raise TimeoutError(f"{unique_id} not finished after {timeout} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def children(self) -> list[int]:
        """PIDs of the supervisor's child processes."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def _kill_tree(pid: int) -> None:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for child in [int(p) for p in out.split()]:
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def running(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, port: int, state_dir: Path,
            ready_timeout: Optional[float] = 90) -> Iterator[Server]:
    """Start the `fastdeploy` command line ``cmd`` in ``cwd``, its output in a log file of its own;
    wait until it is ready (unless ``ready_timeout`` is None); always stop it and its children."""
    log_path = Path(tempfile.mkstemp(prefix="fd-log-", suffix=".txt")[1])
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(list(cmd), env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=str(cwd))
    server = Server(proc, port, state_dir, log_path)
    try:
        if ready_timeout is not None:
            server.wait_ready(ready_timeout)
        yield server
    finally:
        children = server.children() if proc.poll() is None else []
        server.stop(timeout=30)
        for child in children:
            _kill_tree(child)
        log_path.unlink(missing_ok=True)


@contextmanager
def serve(
    recipe: Path | str,
    *,
    command: str = "run",
    args: Sequence[str] = (),
    env: Optional[dict[str, str]] = None,
    state_dir: Optional[Path] = None,
    port: Optional[int] = None,
    ready: bool = True,
    ready_timeout: float = 90,
) -> Iterator[Server]:
    """Run `python -m fastdeploy COMMAND RECIPE` on a free port; always stop it and its children."""
    port = port or free_port()
    own_state = state_dir is None
    state = Path(tempfile.mkdtemp(prefix="fd-state-")) if state_dir is None else state_dir
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    # one API process unless a test asks for more: per-process counters (/metrics) stay predictable
    full_env.update({"FASTDEPLOY_STATE_DIR": str(state), "FASTDEPLOY_HEARTBEAT_SECONDS": "0.2", "WORKERS": "1"})
    full_env.update(env or {})
    where = [] if command == "worker" else ["--host", "127.0.0.1", "--port", str(port)]  # workers serve no HTTP
    cmd = [sys.executable, "-m", "fastdeploy", command, str(recipe), *where, *args]
    try:
        with running(cmd, env=full_env, cwd=ROOT, port=port, state_dir=state,
                     ready_timeout=ready_timeout if ready else None) as server:
            yield server
    finally:
        if own_state:
            subprocess.run(["rm", "-rf", str(state)], check=False)


def module_server(recipe: Path | str, *, args: Sequence[str] = (),
                  env: Optional[dict[str, str]] = None) -> Callable[[], Iterator[Server]]:
    """A module-scoped fixture serving ``recipe`` (see ``serve``) to the tests of the module that
    assigns it; the fixture is named after the variable."""

    @pytest.fixture(scope="module")
    def server() -> Iterator[Server]:
        with serve(recipe, args=args, env=env) as started:
            yield started

    return server


SIZES_PREDICTOR = (
    "import hashlib, os, time\n\n\n"
    "def predictor(inputs, batch_size=1):\n"
    "    time.sleep(float(os.environ.get('FD_TEST_SLEEP', '0')))\n"
    "    out = []\n"
    "    for path in inputs:\n"
    "        data = open(path, 'rb').read()\n"
    "        out.append({'name': os.path.basename(path), 'size': len(data),\n"
    "                    'sha256': hashlib.sha256(data).hexdigest()})\n"
    "    return out\n"
)


def make_file_recipe(folder: Path, predictor: str = SIZES_PREDICTOR) -> Path:
    """A tiny FILE recipe in ``folder``; by default each file's name, size and SHA-256 (after
    FD_TEST_SLEEP seconds per call, when set), else the ``predictor`` source given."""
    (folder / "examples").mkdir(parents=True)
    (folder / "examples" / "a.txt").write_bytes(b"example")
    (folder / "example.py").write_text('input_type = "file"\nexample = ["examples/a.txt"]\n')
    (folder / "predictor.py").write_text(predictor)
    return folder
