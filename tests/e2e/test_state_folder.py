"""One state folder, one service, through the real CLI: a second `fastdeploy run` of the same folder
stops at once naming the first (pid, port) and the ways to run a second copy, instead of sharing the
queue silently; the folder is free again once the first is killed -9. `serve` and `worker` share a
folder with each other, never with a `run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import RECIPES, ROOT, Server, free_port, serve, wait_until

ECHO = RECIPES / "echo"


def start(command: str, state: Path, port: int) -> subprocess.CompletedProcess[str]:
    """Run ``fastdeploy COMMAND`` on ``state`` to its end (it is expected to stop by itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({"FASTDEPLOY_STATE_DIR": str(state), "WORKERS": "1"})
    where = ["--host", "127.0.0.1", "--port", str(port)] if command != "worker" else []
    return subprocess.run([sys.executable, "-m", "fastdeploy", command, str(ECHO), *where],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def serves(server: Server, value: str) -> bool:
    return bool(server.post("/sync", {"data": [value]}).json()["prediction"] == [value])


def test_a_second_run_of_one_state_folder_stops_at_once_naming_the_first(tmp_path):
    state = tmp_path / "state"
    with serve(ECHO, state_dir=state) as first:
        started = time.monotonic()
        second = start("run", state, free_port())
        assert second.returncode == 2, second.stderr
        assert time.monotonic() - started < 20  # at start-up, before any predictor is imported
        said = second.stderr
        assert f"is in use by `fastdeploy run` (pid {first.proc.pid} on " in said and f"port {first.port})" in said
        assert "--state-dir" in said and "--broker" in said and "Traceback" not in said
        assert "importing the predictor" not in said  # it stopped before starting anything
        assert serves(first, "still mine") and "exited with code" not in first.log()
        children = first.children()
        os.kill(first.proc.pid, signal.SIGKILL)  # the kernel drops its lock: no stale lock blocks a restart
        first.proc.wait(10)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 30, "its children to stop")
    with serve(ECHO, state_dir=state) as again:
        assert serves(again, "a new run")


def test_serve_and_worker_share_a_folder_but_not_with_a_run(tmp_path):
    state = tmp_path / "state"
    with serve(ECHO, command="worker", state_dir=state, ready=False) as worker:
        with serve(ECHO, command="serve", state_dir=state) as api:  # ready: the worker's loop serves it
            assert serves(api, "halves of one service")
            run = start("run", state, free_port())
            assert run.returncode == 2, run.stderr
            assert f"`fastdeploy worker` (pid {worker.proc.pid} on " in run.stderr
            assert f"`fastdeploy serve` (pid {api.proc.pid} on " in run.stderr and f"port {api.port})" in run.stderr
            assert serves(api, "still served")
    with serve(ECHO, state_dir=state) as running:
        for command in ("serve", "worker"):
            refused = start(command, state, free_port())
            assert refused.returncode == 2, refused.stderr
            assert f"in use by `fastdeploy run` (pid {running.proc.pid} on " in refused.stderr
            assert "--state-dir" in refused.stderr and "Traceback" not in refused.stderr
        assert serves(running, "alone")
