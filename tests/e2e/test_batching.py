"""Batching across concurrent requests, splitting big requests, chains and priority order."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import TEST_RECIPES, serve


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_concurrent_requests_share_predictor_calls_never_above_batch_size(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "0.1", "BATCH_SIZE": "8"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        assert server.get("/meta").json()["stages"][0]["batch_size"] == 8

        def send(i: int) -> dict:
            return server.post("/sync", {"data": [f"r{i}"]}).json()

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(send, range(24)))
        for i, answer in enumerate(answers):
            assert answer["success"] is True and answer["prediction"] == [{"echo": f"r{i}", "pid": answer["prediction"][0]["pid"]}]
        sizes = [len(call["inputs"]) for call in _calls(log)]
        assert sum(sizes) == 24
        assert max(sizes) <= 8
        assert max(sizes) > 1, f"no batching across requests: {sizes}"

        # one request bigger than the batch size is split and reassembled in order
        log.write_text("")
        big = [f"item{i}" for i in range(21)]
        answer = server.post("/sync", {"data": big}).json()
        assert [p["echo"] for p in answer["prediction"]] == big
        assert [len(call["inputs"]) for call in _calls(log)] == [8, 8, 5]


def test_batch_size_is_measured_when_not_fixed(tmp_path):
    with serve(TEST_RECIPES / "slow", env={"FD_TEST_SLEEP": "0.0"}) as server:
        stage = server.get("/meta").json()["stages"][0]
        assert stage["batch_size"] >= 1
        assert "searching for the batch size" in server.log() and "<- chosen" in server.log()


def test_chain_runs_stages_in_order_each_batched(tmp_path):
    with serve(TEST_RECIPES / "chain", env={"BATCH_SIZE": "4"}) as server:
        meta = server.get("/meta").json()
        assert meta["name"] == "two-stage chain"
        assert [s["file"] for s in meta["stages"]] == ["predictor_1.py", "predictor_2.py"]
        answer = server.post("/sync", {"data": [1, 2, 3, 4, 5, 6]}).json()
        assert answer["success"] is True
        assert [p["double"] for p in answer["prediction"]] == [2, 4, 6, 8, 10, 12]
        assert [p["input"] for p in answer["prediction"]] == [1, 2, 3, 4, 5, 6]
        assert max(p["stage2_batch"] for p in answer["prediction"]) <= 4
        unique_id = server.post("/async", {"data": [7]}).json()["unique_id"]
        assert server.wait_result(unique_id)["prediction"][0]["double"] == 14


def test_lower_priority_number_is_served_first(tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "0.6", "BATCH_SIZE": "1"}
    with serve(TEST_RECIPES / "slow", env=env) as server:
        blocker = server.post("/async", {"data": ["blocker"]}).json()["unique_id"]
        deadline = time.monotonic() + 10
        while server.post("/result", {"unique_id": blocker}).json()["status"] != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ids = {}
        for name, priority in [("p9", 9), ("p5", 5), ("default_async", None), ("p0", 0), ("p5b", 5)]:
            body = {"data": [name]} if priority is None else {"data": [name], "priority": priority}
            ids[name] = server.post("/async", body).json()["unique_id"]
        for unique_id in ids.values():
            server.wait_result(unique_id)
        order = [call["inputs"][0] for call in _calls(log)]
        assert order == ["blocker", "p0", "p5", "p5b", "p9", "default_async"]
