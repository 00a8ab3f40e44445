"""Paths given by the user are relative to where the command was started (#12, point 4).

The supervisor's children run in the recipe folder; a relative --state-dir used to make the
API servers exit in a loop and the loop write a second database under the recipe folder.
These tests start the real CLI from a folder of their own (tests.helpers.serve always runs
from the repository root).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import ContextManager, Sequence

import requests

from tests.helpers import RECIPES, ROOT, Server, free_port, running


def serve_from(cwd: Path, recipe: str, args: Sequence[str] = ()) -> ContextManager[Server]:
    """`fastdeploy run RECIPE ARGS` started in ``cwd`` (no FASTDEPLOY_* variables: the flags say it all)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONDONTWRITEBYTECODE": "1",  # so "nothing was written in the recipe folder" holds to the byte
        "FASTDEPLOY_HEARTBEAT_SECONDS": "0.2",
        "WORKERS": "1",
    })
    cmd = [sys.executable, "-m", "fastdeploy", "run", recipe, "--host", "127.0.0.1", "--port", str(port), *args]
    return running(cmd, env=env, cwd=cwd, port=port, state_dir=cwd, ready_timeout=60)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_relative_state_dir_is_relative_to_where_the_command_started(tmp_path):
    shutil.copytree(RECIPES / "echo", tmp_path / "recipe")
    before = _files(tmp_path / "recipe")
    with serve_from(tmp_path, "recipe", ["--state-dir", "rel/state"]) as server:
        assert server.post("/sync", {"data": ["hello"]}).json()["prediction"] == ["hello"]
        unique_id = server.post("/async", {"data": [1]}).json()["unique_id"]
        assert server.wait_result(unique_id)["status"] == "done"
        api_pids = [p for p in server.children() if b"_api" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(api_pids) == 1
        assert "exited with code" not in server.log(), server.log()  # no child died and was restarted
    assert (tmp_path / "rel" / "state" / "jobs.sqlite3").is_file()
    assert _files(tmp_path / "recipe") == before  # no second database, no state folder, nothing at all


def test_a_relative_api_keys_file_is_relative_to_where_the_command_started(tmp_path):
    shutil.copytree(RECIPES / "echo", tmp_path / "recipe")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "keys.txt").write_text("key-from-a-relative-file\n")
    args = ["--state-dir", str(tmp_path / "state"), "--api-keys-file", "conf/keys.txt"]
    with serve_from(tmp_path, "recipe", args) as server:
        refused = requests.post(server.url + "/sync", json={"data": [1]}, timeout=30)
        assert refused.status_code == 401
        answer = requests.post(server.url + "/sync", json={"data": [1]}, timeout=30,
                               headers={"Authorization": "Bearer key-from-a-relative-file"})
        assert answer.status_code == 200 and answer.json()["prediction"] == [1]
        assert "exited with code" not in server.log(), server.log()
