"""Each command takes only the options that do something for it (#19, point 13), through the real CLI.

`fastdeploy worker` runs prediction loops and serves no HTTP, `fastdeploy serve` runs API servers and
no predictor: a flag the command would ignore is refused with the reason and the command to give it
to, and its `--help` does not list it. Environment variables stay shared: one env file serves every
command, and each ignores the variables of the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import pytest

from tests.helpers import RECIPES, ROOT, _kill_tree, free_port, running, serve

RECIPE = RECIPES / "echo"
EXIT_WITHIN_SECONDS = 20.0


def _run_to_exit(args: list[str], tmp_path: Path) -> tuple[Optional[int], str]:
    """`fastdeploy ARGS` until it exits by itself (None: still running after EXIT_WITHIN_SECONDS, then
    killed with its children); its exit code and what it said."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env["FASTDEPLOY_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.Popen([sys.executable, "-m", "fastdeploy", *args], env=env, cwd=str(ROOT), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=EXIT_WITHIN_SECONDS)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, _ = proc.communicate()
        return None, out


def _help(command: str) -> set[str]:
    done = subprocess.run([sys.executable, "-m", "fastdeploy", command, "--help"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60)
    assert done.returncode == 0, done.stderr
    return {word.rstrip(",") for word in done.stdout.split() if word.startswith("--")}


def test_each_command_lists_only_its_own_options():
    worker, serve_, run = _help("worker"), _help("serve"), _help("run")
    for flag in ("--port", "--host", "--api-keys", "--cors-origins", "--webhook-secret", "--http-processes",
                 "--result-ttl"):
        assert flag not in worker and flag in serve_ and flag in run, flag
    for flag in ("--batch-size", "--replicas", "--devices", "--threads", "--lease-seconds"):
        assert flag not in serve_ and flag in worker and flag in run, flag
    for flag in ("--broker", "--state-dir", "--store-secret", "--log-level", "--spin-us"):
        assert flag in worker and flag in serve_ and flag in run, flag


@pytest.mark.parametrize("args, reason", [
    (["worker", str(RECIPE), "--port", "9999"],
     "--port does nothing for `fastdeploy worker`: workers serve no HTTP; give it to `fastdeploy serve`"),
    (["worker", str(RECIPE), "--api-keys=k1"], "--api-keys does nothing for `fastdeploy worker`"),
    (["worker", str(RECIPE), "--workers", "2"], "--workers does nothing for `fastdeploy worker`"),  # a former name
    (["serve", str(RECIPE), "--batch-size", "4"],
     "--batch-size does nothing for `fastdeploy serve`: API servers run no predictor; give it to `fastdeploy worker`"),
    (["serve", str(RECIPE), "--devices", "0", "--port", "0"], "--devices does nothing for `fastdeploy serve`"),
    (["build", str(RECIPE), "--no-build", "--batch-size", "4"],
     "--batch-size does nothing for `fastdeploy build`: the image reads its settings from its environment when it "
     "runs (docker run -e FASTDEPLOY_BATCH_SIZE=...)"),
], ids=["worker-port", "worker-api-keys", "worker-workers", "serve-batch-size", "serve-devices", "build-batch-size"])
def test_a_flag_that_does_nothing_for_the_command_is_refused_with_the_reason(tmp_path, args, reason):
    code, said = _run_to_exit(args, tmp_path)
    assert code is not None, f"`fastdeploy {' '.join(args)}` took the flag and ran:\n{said[-2000:]}"
    assert code == 2 and reason in said, said
    assert said.strip().splitlines()[-1].startswith(f"fastdeploy {args[0]}: error: ") and "Traceback" not in said
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_a_shared_environment_is_not_refused(tmp_path):
    """One env file for every command: the worker ignores the API servers' variables, and they its."""
    key = "shared-env-key-0123456789"
    env = {"FASTDEPLOY_PORT": "9", "FASTDEPLOY_API_KEYS": key, "FASTDEPLOY_CORS_ORIGINS": "https://app.example.com",
           "FASTDEPLOY_BATCH_SIZE": "3", "FASTDEPLOY_DEVICES": "cpu"}
    state = tmp_path / "state"
    with ExitStack() as stack:
        worker = stack.enter_context(serve(RECIPE, command="worker", env=env, state_dir=state, ready=False))
        api = stack.enter_context(serve(RECIPE, command="serve", env=env, state_dir=state))
        answer = api.post("/sync", {"data": ["shared"]}, headers={"X-API-Key": key})
        assert answer.status_code == 200 and answer.json()["prediction"] == ["shared"], answer.text
        assert api.get("/meta", headers={"X-API-Key": key}).json()["stages"][0]["batch_size"] == 3
        assert worker.proc.poll() is None, worker.log()  # still running: nothing refused


def test_a_3x_config_given_to_rest_and_loop_alike_still_starts_both(tmp_path):
    """3.x gave one --config to --rest and --loop: a key the command ignores is left out, not refused."""
    port, state = free_port(), tmp_path / "state"
    config = f"port={port}, host=127.0.0.1, workers=1, optimal_batch_size=3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({"FASTDEPLOY_STATE_DIR": str(state), "FASTDEPLOY_HEARTBEAT_SECONDS": "0.2"})
    base = [sys.executable, "-m", "fastdeploy", "--recipe", str(RECIPE)]
    with ExitStack() as stack:
        loop = stack.enter_context(running([*base, "--loop", "--config", config], env=env, cwd=ROOT, port=port,
                                           state_dir=state, ready_timeout=None))
        api = stack.enter_context(running([*base, "--rest", "--config", config], env=env, cwd=ROOT, port=port,
                                          state_dir=state))
        assert api.post("/sync", {"data": [1, 2]}).json()["prediction"] == [1, 2]
        assert api.get("/meta").json()["stages"][0]["batch_size"] == 3
        assert f"running `fastdeploy worker {RECIPE} --batch-size 3`" in loop.log(), loop.log()
