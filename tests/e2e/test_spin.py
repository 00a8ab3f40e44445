"""A lone client sending request after request makes the loop and the API server poll
for the next ring instead of sleeping (SPIN_US); SPIN_US=0 turns that off."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import RECIPES, TEST_RECIPES, serve


def _spin_seconds(text: str) -> tuple[float, float]:
    loop = sum(float(v) for v in re.findall(r"^fastdeploy_worker_spin_seconds_total\{[^}]*\} (\S+)$", text, re.M))
    api = re.search(r"^fastdeploy_api_spin_seconds_total (\S+)$", text, re.M)
    assert api is not None, "the API spin counter is missing from /metrics"
    return loop, float(api.group(1))


def _lone_client(url: str, requests_in_a_row: int) -> None:
    with requests.Session() as session:  # one keep-alive connection: one client in a closed loop
        for i in range(requests_in_a_row):
            body = session.post(f"{url}/sync", json={"data": [i]}, timeout=30).json()
            assert body["success"] is True and body["prediction"] == [i]


@pytest.mark.parametrize("spin_us", ["20000", "0"])
def test_a_lone_client_makes_both_sides_spin_unless_turned_off(spin_us):
    # 20 ms: generous, so a slow CI machine's gaps between requests still count as a rhythm
    with serve(RECIPES / "echo", args=["--spin-us", spin_us]) as server:
        _lone_client(server.url, 60)
        deadline = time.monotonic() + 10  # loop figures come with heartbeats (0.2 s in tests)
        loop, api = _spin_seconds(server.get("/metrics").text)
        while spin_us != "0" and loop == 0.0 and time.monotonic() < deadline:
            time.sleep(0.2)
            loop, api = _spin_seconds(server.get("/metrics").text)
        if spin_us == "0":
            time.sleep(0.5)  # a heartbeat's time: a loop that spun would have said so
            assert _spin_seconds(server.get("/metrics").text) == (0.0, 0.0)
        else:
            assert loop > 0.0, "the loop never polled for the next job"
            assert api > 0.0, "the API server never polled for a lone /sync answer"
            # spinning stays bounded: each wait polls for at most SPIN_US
            assert loop <= 60 * 0.020 and api <= 60 * 0.020


def test_a_loop_that_dies_in_the_lone_rhythm_had_its_job_leased_and_it_is_requeued(tmp_path):
    # polling never bends what a job means: the job being predicted was claimed (processing),
    # so the loop's death requeues it (and counts toward the deaths that fail a job)
    marker = tmp_path / "crashed"
    env = {"BATCH_SIZE": "1", "FD_TEST_CRASH_MARKER": str(marker)}
    with serve(TEST_RECIPES / "faulty", args=["--spin-us", "20000"], env=env) as server:
        with requests.Session() as session:
            for i in range(30):
                assert session.post(f"{server.url}/sync", json={"data": [i]}, timeout=30).json()["prediction"] == [i]
            response = session.post(f"{server.url}/sync", json={"data": ["crash"]}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["prediction"] == ["crash"]
        assert marker.exists()  # it did die on it
        log = server.log()
        assert "exited with code 3; 1 job(s) requeued" in log, log[-2000:]


def test_in_the_lone_rhythm_each_input_is_predicted_once(tmp_path):
    # a fixed batch size makes the loop wait for a fuller batch after a batch of one, with
    # its doorbell in the lone rhythm; nothing may be predicted twice
    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_LOG": str(log), "FD_TEST_SLEEP": "0.002", "BATCH_SIZE": "8", "FASTDEPLOY_MAX_WAIT": "1000"}
    with serve(TEST_RECIPES / "slow", args=["--spin-us", "20000"], env=env) as server:
        with requests.Session() as session:
            for i in range(40):
                body = session.post(f"{server.url}/sync", json={"data": [f"r{i}"]}, timeout=30).json()
                assert [p["echo"] for p in body["prediction"]] == [f"r{i}"]
        # then a crowd arrives while the loop is still in the lone rhythm
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: server.post("/sync", {"data": [f"c{i}"]}).json(), range(48)))
        assert [a["prediction"][0]["echo"] for a in answers] == [f"c{i}" for i in range(48)]
        predicted = [x for line in log.read_text().splitlines() for x in json.loads(line)["inputs"]]
        expected = [f"r{i}" for i in range(40)] + [f"c{i}" for i in range(48)]
        assert sorted(predicted) == sorted(expected), predicted
        assert max(len(json.loads(line)["inputs"]) for line in log.read_text().splitlines()) > 1  # batched again
