"""Process layout: several API server processes, several loops per stage, a fresh install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def _api_pids(server) -> list[int]:
    pids = []
    for pid in server.children():
        try:
            if b"_api" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                pids.append(pid)
        except OSError:  # a process that has just exited
            continue
    return pids


def _established_connections(pid: int, port: int) -> int:
    """TCP connections on the server's port that the process holds (from /proc, no tools needed)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
                count += 1
    return count


def _wait_until_dead(pid: int) -> None:
    """Until the process has exited (a zombie has closed its sockets too)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not exit")


def _open_clients(server, n: int) -> list:
    import requests

    sessions = [requests.Session() for _ in range(n)]

    def first(i: int) -> bool:  # keep-alive: each session keeps its connection
        return sessions[i].post(f"http://127.0.0.1:{server.port}/sync", json={"data": [i]}, timeout=30).json()["success"]

    with ThreadPoolExecutor(n) as pool:  # all at once, as a load generator or a client pool connects
        assert all(pool.map(first, range(n)))
    return sessions


def test_connections_are_spread_over_the_api_processes_and_survive_one_dying():
    with serve(RECIPES / "echo", env={"WORKERS": "2"}) as server:
        apis = _api_pids(server)
        assert len(apis) == 2
        sessions = _open_clients(server, 16)
        counts = [_established_connections(pid, server.port) for pid in apis]
        assert sum(counts) == 16 and min(counts) >= 2, counts  # a shared socket gave 13 / 3 here
        for s in sessions:
            s.close()
        os.kill(apis[0], 9)
        _wait_until_dead(apis[0])
        time.sleep(0.2)  # the kernel drops a closed listener from the port's group within moments
        # new connections go to the live process at once, while the dead one restarts
        import requests

        url = f"http://127.0.0.1:{server.port}/sync"
        answers = [requests.post(url, json={"data": [i]}, headers={"Connection": "close"}, timeout=30).json()
                   for i in range(20)]
        assert [a["prediction"] for a in answers] == [[i] for i in range(20)]
        deadline = time.monotonic() + 30
        while len(_api_pids(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        restarted = _api_pids(server)
        assert len(restarted) == 2 and apis[0] not in restarted
        sessions = _open_clients(server, 16)
        counts = [_established_connections(pid, server.port) for pid in restarted]
        assert sum(counts) == 16 and min(counts) >= 2, counts
        for s in sessions:
            s.close()


def test_a_second_service_on_the_same_port_is_refused_and_leaves_the_first_alone(tmp_path):
    with serve(RECIPES / "echo", env={"WORKERS": "2"}) as first:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
        env["FASTDEPLOY_STATE_DIR"] = str(first.state_dir)  # the same state folder too
        second = subprocess.run(
            [sys.executable, "-m", "fastdeploy", "run", str(RECIPES / "echo"), "--host", "127.0.0.1",
             "--port", str(first.port)],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert "cannot listen on 127.0.0.1:%d" % first.port in second.stderr and "Traceback" not in second.stderr
        assert len(_api_pids(first)) == 2
        assert first.post("/sync", {"data": ["still mine"]}).json()["prediction"] == ["still mine"]


def test_the_supervisor_folds_the_write_ahead_log_into_the_database_file(tmp_path):
    """Request connections leave checkpoints (and their fsync) to the supervisor's thread
    (tests/store/test_sqlite_store.py checks they only do it past 64 MB), so the jobs
    written here reach the database file only if that thread runs."""
    state = tmp_path / "state"
    with serve(RECIPES / "echo", state_dir=state) as server:
        db_file = state / "jobs.sqlite3"
        before = db_file.stat().st_size
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: server.post("/sync", {"data": [i]}).json(), range(400)))
        assert all(answer["success"] for answer in answers)
        deadline = time.monotonic() + 10
        while db_file.stat().st_size <= before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db_file.stat().st_size > before
