"""Bad recipes fail fast (#12, point 7), through the real CLI.

A predictor that cannot be imported (a syntax error, a missing dependency) or that raises on
the example at start-up stops `fastdeploy run` and `fastdeploy worker` within seconds, with a
non-zero exit and the predictor's own error in one line (type, message, recipe file and line)
instead of a restart loop of tracebacks. A loop that dies after it was ready is restarted; once
its restarts fail to get ready three times in a row, /ready says why and /sync and /async answer
503 with that reason at once (not after TIMEOUT), until a loop gets ready again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import requests

from tests.helpers import ROOT, _kill_tree, free_port, serve

EXIT_WITHIN_SECONDS = 20.0


def _recipe(folder: Path, predictor: str, example: str = "example = [1, 2]\n") -> Path:
    folder.mkdir()
    (folder / "predictor.py").write_text(predictor)
    (folder / "example.py").write_text(example)
    return folder


def _run_to_exit(recipe: Path, command: str, tmp_path: Path) -> tuple[Optional[int], str, float]:
    """Run `fastdeploy COMMAND RECIPE` until it exits by itself (or EXIT_WITHIN_SECONDS pass: then it is
    killed with its children and the exit code is None); its exit code, stderr and how long it ran."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({"FASTDEPLOY_STATE_DIR": str(tmp_path / "state"), "WORKERS": "1", "FASTDEPLOY_HEARTBEAT_SECONDS": "0.2"})
    cmd = [sys.executable, "-m", "fastdeploy", command, str(recipe)]
    if command != "worker":  # workers serve no HTTP: --host and --port are refused there
        cmd += ["--host", "127.0.0.1", "--port", str(free_port())]
    err_path = tmp_path / "stderr.txt"
    started = time.monotonic()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=err)
    try:
        code: Optional[int] = proc.wait(timeout=EXIT_WITHIN_SECONDS)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _kill_tree(proc.pid)
        proc.wait()
    return code, err_path.read_text(errors="replace"), time.monotonic() - started


def _assert_stops_with(recipe: Path, command: str, tmp_path: Path, *expected: str) -> None:
    code, stderr, seconds = _run_to_exit(recipe, command, tmp_path)
    assert code is not None, f"`fastdeploy {command}` still ran after {EXIT_WITHIN_SECONDS:g} s:\n{stderr[-3000:]}"
    assert code != 0, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fastdeploy: error: "), stderr  # the reason is the last thing said
    for text in expected:
        assert text in last, (text, stderr)
    assert "Traceback" not in stderr and "fastdeploy/loop.py" not in stderr, stderr  # no page of our frames
    assert stderr.count(expected[0]) == 1, stderr  # said once, not once per restart
    assert seconds < EXIT_WITHIN_SECONDS


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_syntax_error_stops_the_service_with_its_place(tmp_path, command):
    recipe = _recipe(tmp_path / "recipe", "def predictor(inputs, batch_size=1):\n    return [x for x in inputs\n")
    _assert_stops_with(recipe, command, tmp_path, "SyntaxError", "could not be imported", "(predictor.py, line 2)")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_missing_dependency_stops_the_service_with_its_name(tmp_path, command):
    source = ("import os\nimport fastdeploy_test_no_such_dependency\n\n\n"
              "def predictor(inputs, batch_size=1):\n    return inputs\n")
    recipe = _recipe(tmp_path / "recipe", source)
    _assert_stops_with(recipe, command, tmp_path, "ModuleNotFoundError", "fastdeploy_test_no_such_dependency",
                       "(predictor.py, line 2)")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_predictor_raising_on_the_example_stops_the_service(tmp_path, command):
    source = (
        "def _load(path):\n"
        "    raise RuntimeError(f'no weights at {path}')\n"
        "\n\n"
        "def predictor(inputs, batch_size=1):\n"
        "    return _load('/models/missing.bin')\n"
    )
    recipe = _recipe(tmp_path / "recipe", source)
    _assert_stops_with(recipe, command, tmp_path, "RuntimeError: no weights at /models/missing.bin",
                       "failed on example.py at start-up", "(predictor.py, line 2)")


def test_a_predictor_returning_a_dict_on_the_example_stops_the_service(tmp_path):
    recipe = _recipe(tmp_path / "recipe", "def predictor(inputs, batch_size=1):\n    return {'a': 1, 'b': 2}\n")
    _assert_stops_with(recipe, "run", tmp_path, "the predictor returned a dict", "failed on example.py")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_outputs_no_answer_can_carry_stop_the_service(tmp_path, command):
    # (#19 point 10) the warm-up passed, then every request got 500; only the second example input's
    # output is bad: every input of the example is predicted and encoded at start-up
    source = ("class Box:\n    pass\n\n\n"
              "def predictor(inputs, batch_size=1):\n    return [Box() if x == 'boxed' else x for x in inputs]\n")
    recipe = _recipe(tmp_path / "recipe", source, example="example = ['plain', 'boxed']\n")
    _assert_stops_with(recipe, command, tmp_path, "its output cannot be encoded as JSON",
                       "failed on example.py at start-up", "Type is not JSON serializable: Box")


def test_a_chain_stage_whose_outputs_cannot_be_pickled_stops_the_service(tmp_path):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "predictor_1.py").write_text(
        "def predictor(inputs, batch_size=1):\n    return [(x for _ in range(2)) for x in inputs]\n")
    (recipe / "predictor_2.py").write_text(
        "def predictor(inputs, batch_size=1):\n    return [len(list(g)) for g in inputs]\n")
    (recipe / "example.py").write_text("example = [1, 2]\n")
    _assert_stops_with(recipe, "run", tmp_path, "its output cannot be pickled for the next stage",
                       "the predictor of stage 0 (predictor_1.py)", "cannot pickle 'generator' object")


DIES_WHEN_MARKED = """
import os
from pathlib import Path

MARKER = Path(os.environ["FD_TEST_DIE_MARKER"])


def predictor(inputs, batch_size=1):
    if MARKER.exists():
        os._exit(3)  # the process dies without a word: no reason reaches anyone but its exit code
    return inputs
"""


def _wait_for(check, seconds: float, what: str, server) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"{what} within {seconds:g} s:\n{server.log()[-4000:]}"
        time.sleep(0.1)


def test_a_loop_that_keeps_dying_after_it_was_ready_makes_the_service_say_why(tmp_path):
    marker = tmp_path / "die"
    recipe = _recipe(tmp_path / "recipe", DIES_WHEN_MARKED)
    env = {"FD_TEST_DIE_MARKER": str(marker), "BATCH_SIZE": "2", "TIMEOUT": "60"}
    with serve(recipe, env=env) as server:
        assert server.post("/sync", {"data": [1]}).json()["prediction"] == [1]
        marker.write_text("die")
        queued = server.post("/async", {"data": ["kept"]}).json()["unique_id"]  # kills the ready loop

        def says_why() -> bool:
            answer = server.get("/ready")
            return answer.status_code == 503 and "failed to start 3 times in a row" in answer.json()["reason"]

        _wait_for(says_why, 60, "/ready saying why the loop cannot start", server)
        reason = server.get("/ready").json()["reason"]
        assert "stage 0" in reason and "exited with code 3" in reason, reason
        for path in ("/sync", "/async"):
            started = time.monotonic()
            answer = server.post(path, {"data": [2]}, timeout=10)
            assert answer.status_code == 503, answer.text
            assert answer.json()["reason"] == reason and answer.headers.get("retry-after")
            assert time.monotonic() - started < 2.0  # at once, not after TIMEOUT
        assert server.proc.poll() is None  # the service was ready once: it keeps trying, it does not stop

        marker.unlink()  # the cause goes away: the next restart gets ready and everything serves again
        _wait_for(lambda: server.get("/ready").status_code == 200, 60, "/ready 200 again", server)
        assert server.post("/sync", {"data": [3]}).json()["prediction"] == [3]
        assert server.wait_result(queued)["status"] == "done"  # the job accepted before the failures was kept
        _wait_for(lambda: [w["ready"] for w in server.get("/meta").json()["stages"][0]["workers"]] == [True], 5,
                  "the failure record to be gone", server)


def test_ready_stays_plain_loading_while_a_slow_predictor_loads(tmp_path):
    """No false alarm: a loop still loading is 'loading', and requests wait for it as before."""
    source = "import time\ntime.sleep(3)\n\n\ndef predictor(inputs, batch_size=1):\n    return inputs\n"
    recipe = _recipe(tmp_path / "recipe", source)
    with serve(recipe, env={"BATCH_SIZE": "1"}, ready=False) as server:
        _wait_for(lambda: _answers(server, "/health"), 30, "/health", server)
        answer = server.get("/ready")
        assert answer.status_code == 503 and "loading" in answer.json()["reason"]
        assert server.post("/sync", {"data": [7]}).json()["prediction"] == [7]


def _answers(server, path: str) -> bool:
    try:
        return server.get(path).status_code == 200
    except requests.RequestException:
        return False
