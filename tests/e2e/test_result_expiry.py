"""How long finished jobs stay, through the real CLI (issue 25, point 8: the state folder's footprint).

- A /sync prediction, which its caller already has, stays readable at /result for --sync-result-ttl
  (30 s by default), not --result-ttl; /result of it afterwards says that /sync results are kept only
  that long. /async results stay --result-ttl.
- Under steady /sync load the embedded store keeps only the last few seconds of jobs: expired rows
  go as fast as new ones come, so the state folder stops growing.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import requests

from tests.helpers import RECIPES, serve, wait_until

ECHO = RECIPES / "echo"


def _result(url: str, unique_id: str) -> requests.Response:
    return requests.post(url + "/result", json={"unique_id": unique_id}, timeout=30)


def test_a_sync_result_expires_after_its_own_ttl_and_result_says_so(store_args: list[str]) -> None:
    with serve(ECHO, args=["--sync-result-ttl", "1", *store_args]) as server:
        synced = server.post("/sync", {"data": ["waited for"]})
        assert synced.status_code == 200, synced.text
        sync_id = synced.json()["unique_id"]
        first = _result(server.url, sync_id).json()
        assert (first["status"], first["prediction"]) == ("done", ["waited for"])  # readable at first
        async_id = server.post("/async", {"data": ["fetched later"]}).json()["unique_id"]
        assert server.wait_result(async_id)["status"] == "done"

        def expired() -> dict | None:
            answer = _result(server.url, sync_id)
            return answer.json() if answer.status_code == 404 else None  # a 404 Response itself is falsy

        body = wait_until(expired, 15, "the /sync result to expire")
        assert (body["status"], body["success"], body["unique_id"]) == ("not_found", False, sync_id)
        reason = body["reason"]
        assert "/sync" in reason and "only 1 s" in reason and "3600 s" in reason, reason
        kept = _result(server.url, async_id)  # /async results stay --result-ttl (an hour)
        assert kept.status_code == 200 and kept.json()["prediction"] == ["fetched later"], kept.text


class _Load:
    """Threads sending /sync requests back to back; remembers when each answer came."""

    def __init__(self, url: str, threads: int) -> None:
        self.url, self.stop, self.answered, self.errors = url, threading.Event(), [], []
        self.threads = [threading.Thread(target=self._send, args=(i,), daemon=True) for i in range(threads)]

    def _send(self, n: int) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                answer = session.post(self.url + "/sync", json={"data": [n]}, timeout=30)
                if answer.status_code == 200:
                    self.answered.append(time.monotonic())
                else:
                    self.errors.append(answer.status_code)

    def since(self, moment: float) -> int:
        return sum(1 for at in list(self.answered) if at >= moment)


def _rows_and_bytes(folder: Path) -> tuple[int, int]:
    """Jobs the embedded store holds now, and its database file's size (the WAL aside: it is bounded)."""
    path = folder / "jobs.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        (rows,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
    finally:
        db.close()
    return int(rows), path.stat().st_size


def test_under_steady_sync_load_the_state_folder_stops_growing() -> None:
    with serve(ECHO, args=["--sync-result-ttl", "1"]) as server:
        load = _Load(server.url, threads=6)
        for thread in load.threads:
            thread.start()
        samples: list[tuple[float, int, int]] = []
        try:
            started = time.monotonic()
            while time.monotonic() - started < 10:
                time.sleep(0.5)
                samples.append((time.monotonic(), *_rows_and_bytes(server.state_dir)))
        finally:
            load.stop.set()
            for thread in load.threads:
                thread.join(timeout=30)
        assert not load.errors, load.errors[:10]
        assert len(load.answered) > 500, len(load.answered)
        for at, rows, _ in samples[8:]:  # after 4 s: a job is kept 1 s after it ends, swept within 0.5 s
            assert rows <= load.since(at - 3.0) + 50, (rows, load.since(at - 3.0), len(load.answered))
        middle, end = samples[len(samples) // 2][2], samples[-1][2]
        assert end <= middle * 1.25 + 128 * 1024, (middle, end, samples)
