"""Process layout: several API server processes, several loops per stage, a fresh install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import RECIPES, ROOT, TEST_RECIPES, free_port, serve


def test_several_api_processes_and_loops_share_one_queue(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {"WORKERS": "2", "FASTDEPLOY_REPLICAS": "2", "FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "0.05",
           "BATCH_SIZE": "4"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        assert len(server.children()) == 4  # two API servers, two loops
        meta = server.get("/meta").json()
        assert len(meta["stages"][0]["workers"]) == 2

        def send(i: int) -> dict:
            return server.post("/sync", {"data": [i]}).json()

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(send, range(200)))
        assert [a["prediction"][0]["echo"] for a in answers] == list(range(200))
        pids = {json.loads(line)["pid"] for line in log.read_text().splitlines()}
        assert len(pids) == 2, "both loops should have predicted"
        ids = [server.post("/async", {"data": [i]}).json()["unique_id"] for i in range(20)]
        assert [server.wait_result(u)["prediction"][0]["echo"] for u in ids] == list(range(20))
        # whichever process answers the scrape, it counts the requests of both
        for _ in range(6):
            text = server.get("/metrics").text
            assert 'fastdeploy_requests_total{endpoint="sync",status="200"} 200.0' in text, text
            assert 'fastdeploy_requests_total{endpoint="async",status="200"} 20.0' in text


@pytest.mark.timeout(600)
def test_pip_install_in_a_fresh_venv_then_run(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(ROOT)], check=True, cwd=tmp_path)
    fastdeploy = venv / "bin" / "fastdeploy"
    assert fastdeploy.exists()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env["FASTDEPLOY_STATE_DIR"] = str(tmp_path / "state")
    proc = subprocess.Popen([str(fastdeploy), "run", str(RECIPES / "echo"), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.helpers import Server

        server = Server(proc, port, tmp_path / "state", Path(os.devnull))
        server.wait_ready(120)
        assert server.post("/sync", {"data": ["installed"]}).json()["prediction"] == ["installed"]
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
