"""Crash suite: 1,000 /async jobs with webhooks while processes die by SIGKILL.

Every process is the real CLI. Each scenario submits 1,000 jobs (each with a webhook to a
local receiver) from several client threads, kills processes with SIGKILL while jobs are
queued and being predicted, and then checks the two promises of an accepted job:

- every id answered 200 by /async ends ``done`` at /result with its own prediction;
- every such job's webhook arrives at least once (duplicates are allowed: at least once).

A submission that fails because its API server died under it is sent again (a new job: the
first may or may not have been written, and nobody learnt its id). Predictions are slower
than submissions, so a backlog is always queued and a batch is in flight when a kill lands.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pytest
import requests

from tests.helpers import TEST_RECIPES, Server, free_port, serve
from tests.webhook_receiver import ALLOW_LOCAL_ENV, Receiver

JOBS = 1000
CLIENTS = 8
RATE = 200  # jobs/s the clients submit at: the 1,000 take 5 s, so kills land while jobs still arrive
# 4 inputs per batch, 50 ms per batch: at most ~80 jobs/s, slower than the clients submit
EMBEDDED_ENV = {
    "FD_TEST_SLEEP": "0.05",
    "BATCH_SIZE": "4",
    "FASTDEPLOY_MAX_WAIT": "0",
    "WORKERS": "2",  # two API servers: one can die while the other keeps answering
    "FASTDEPLOY_WEBHOOK_TIMEOUT": "2",  # a dead server's delivery leases run out after 2 + 5 s
    **ALLOW_LOCAL_ENV,
}


# -- clients --------------------------------------------------------------------------------
class Submitter(threading.Thread):
    """Sends JOBS /async requests from CLIENTS threads at RATE jobs/s, round robin over ``urls``;
    a request that fails (connection refused or reset, 503) is sent again, to the next URL."""

    def __init__(self, urls: Sequence[str], webhook: str, deadline_s: float = 90) -> None:
        super().__init__(daemon=True)
        self.urls = list(urls)
        self.webhook = webhook
        self.deadline = time.monotonic() + deadline_s
        self.accepted: dict[str, int] = {}  # unique_id -> job number
        self.refused: list[str] = []  # answers other than 200 and 503: a failure of the test
        self.retries = 0
        self._lock = threading.Lock()
        self._local = threading.local()

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert self.is_alive() and time.monotonic() < deadline, f"only {self.count()} of {n} jobs accepted"
            time.sleep(0.01)

    def run(self) -> None:
        self.started = time.monotonic()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(self._submit, range(JOBS)))

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _submit(self, i: int) -> None:
        body = {"data": [f"job{i}"], "webhook": self.webhook}
        time.sleep(max(0.0, self.started + i / RATE - time.monotonic()))
        attempt = 0
        while time.monotonic() < self.deadline:
            url = self.urls[(i + attempt) % len(self.urls)]
            attempt += 1
            try:
                response = self._session().post(url + "/async", json=body, timeout=10)
            except requests.RequestException:
                self._local.session = requests.Session()  # its pooled connection may be to a dead server
                with self._lock:
                    self.retries += 1
                time.sleep(0.1)
                continue
            if response.status_code == 200:
                with self._lock:
                    self.accepted[response.json()["unique_id"]] = i
                return
            if response.status_code == 503:
                with self._lock:
                    self.retries += 1
                time.sleep(0.2)
                continue
            with self._lock:
                self.refused.append(f"job{i}: {response.status_code} {response.text[:200]}")
            return
        with self._lock:
            self.refused.append(f"job{i}: not accepted before the deadline")

    def finish(self, timeout: float = 90) -> dict[str, int]:
        self.join(timeout)
        assert not self.is_alive(), f"submitting took over {timeout} s ({self.count()} accepted)"
        assert not self.refused, self.refused[:10]
        assert len(self.accepted) == JOBS and sorted(self.accepted.values()) == list(range(JOBS))
        return dict(self.accepted)


def check_every_job(url: str, accepted: dict[str, int], receiver: Receiver, timeout: float = 60) -> list[dict[str, Any]]:
    """Every accepted job's webhook arrives, and /result says done with its own prediction; returns the results."""
    deadline = time.monotonic() + timeout
    while True:
        hooked = {body["unique_id"] for body in receiver.received("/ok")}
        missing = set(accepted) - hooked
        if not missing:
            break
        if time.monotonic() > deadline:
            states = [requests.post(url + "/result", json={"unique_id": u}, timeout=10).json() for u in list(missing)[:5]]
            raise AssertionError(f"{len(missing)} of {len(accepted)} accepted jobs never reached the webhook: {states}")
        time.sleep(0.2)
    for body in receiver.received("/ok"):
        if body["unique_id"] in accepted:
            assert body["status"] == "done" and body["success"] is True, body
            assert body["prediction"][0]["echo"] == f"job{accepted[body['unique_id']]}", body

    session = requests.Session()

    def read(unique_id: str) -> dict[str, Any]:
        return session.post(url + "/result", json={"unique_id": unique_id}, timeout=10).json()

    results: dict[str, dict[str, Any]] = {}
    pending = list(accepted)
    with ThreadPoolExecutor(4) as pool:
        while pending:  # the store learns of a delivery just after the receiver has it
            for body in pool.map(read, pending):
                if body.get("status") != "done" or body.get("webhook", {}).get("status") == "delivered":
                    results[body["unique_id"]] = body
            pending = [u for u in accepted if u not in results]
            if pending:
                assert time.monotonic() < deadline, f"webhooks not recorded as delivered: {read(pending[0])}"
                time.sleep(0.2)
    not_done = [r for r in results.values() if r.get("status") != "done"]
    assert not not_done, f"{len(not_done)} accepted jobs not done: {not_done[:5]}"
    for body in results.values():
        assert body["prediction"][0]["echo"] == f"job{accepted[body['unique_id']]}", body
    return list(results.values())


# -- processes ------------------------------------------------------------------------------
def role(pid: int) -> str:
    """"api" or "loop" for a child of the supervisor (from its command line), else ""."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    return "api" if b"_api" in argv else "loop" if b"_loop" in argv else ""


def children(server: Server, kind: str) -> list[int]:
    return [pid for pid in server.children() if role(pid) == kind]


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except requests.RequestException:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_service(server: Server) -> None:
    """SIGKILL the whole service at once, the supervisor first so it restarts nothing: a power cut.

    Its children run in sessions of their own, so this is every process of the tree, not a killpg."""
    pids = server.children()
    kill(server.proc.pid)
    for pid in pids:
        kill(pid)
    server.proc.wait()
    wait_until(lambda: all(gone(p) for p in pids), 10, "every process of the service to be gone")


def loop_pids(results: list[dict[str, Any]]) -> set[int]:
    return {body["prediction"][0]["pid"] for body in results}


def wait_done(receiver: Receiver, n: int, timeout: float = 60) -> None:
    """Until n distinct jobs have reached the webhook receiver (so n are done)."""
    wait_until(lambda: len({b["unique_id"] for b in receiver.received("/ok")}) >= n, timeout, f"{n} jobs done")


# -- embedded store ---------------------------------------------------------------------------
def test_loop_and_api_server_killed_during_1000_jobs(tmp_path):
    """kill -9 of one of two API servers while jobs arrive, then of the prediction loop mid-batch;
    the supervisor restarts both."""
    with Receiver() as receiver, serve(TEST_RECIPES / "slow", env=EMBEDDED_ENV, state_dir=tmp_path / "state") as server:
        (first_loop,) = children(server, "loop")
        apis = children(server, "api")
        assert len(apis) == 2
        submitter = Submitter([server.url], receiver.url + "/ok")
        submitter.start()

        submitter.wait_for(300)
        kill(apis[0])  # requests in flight on it fail and are sent again; its webhook leases run out
        assert submitter.count() < JOBS
        wait_done(receiver, 150)
        kill(first_loop)  # mid-batch: a 50 ms predictor call is in flight nearly all the time
        assert submitter.count() < JOBS
        wait_until(lambda: len(children(server, "api")) == 2 and apis[0] not in children(server, "api"), 30,
                   "the API server to be restarted")
        wait_until(lambda: children(server, "loop") and children(server, "loop") != [first_loop], 30,
                   "the loop to be restarted")

        accepted = submitter.finish()
        results = check_every_job(server.url, accepted, receiver)
        log = server.log()
        assert "prediction loop for stage 0 exited with code -9" in log and "job(s) requeued" in log
        assert "API server exited with code -9" in log
        assert first_loop in loop_pids(results) and len(loop_pids(results)) == 2, "jobs on both sides of the kill"
        assert server.get("/ready").status_code == 200


def test_whole_service_killed_during_1000_jobs_and_restarted(tmp_path):
    """kill -9 of every process at once (a power cut), then `fastdeploy run` again on the same state folder."""
    state = tmp_path / "state"
    port = free_port()
    with Receiver() as receiver:
        submitter = Submitter([f"http://127.0.0.1:{port}"], receiver.url + "/ok")
        with serve(TEST_RECIPES / "slow", env=EMBEDDED_ENV, state_dir=state, port=port) as first:
            (first_loop,) = children(first, "loop")
            submitter.start()
            submitter.wait_for(500)
            kill_service(first)
            assert submitter.count() < JOBS, "the crash should come while jobs still arrive"
        # the clients keep trying while nothing listens; the same port and state folder come back
        with serve(TEST_RECIPES / "slow", env=EMBEDDED_ENV, state_dir=state, port=port) as second:
            accepted = submitter.finish()
            results = check_every_job(second.url, accepted, receiver)
        assert submitter.retries > 0, "some submissions should have met the dead service"
        pids = loop_pids(results)
        assert first_loop in pids and len(pids) == 2, "jobs predicted before and after the crash"


# -- Redis: API servers and workers as separate processes ------------------------------------------
@pytest.mark.redis
def test_worker_and_api_server_killed_during_1000_jobs_on_redis(redis_url):
    """Two workers and two API servers on one Redis: kill -9 of a whole API server (`serve`) while jobs
    arrive, of a worker's loop (its supervisor restarts it) and of a whole worker (its leases run out)."""
    from tests.e2e.test_redis_scaleout import cluster, ready_workers

    env = {
        "FD_TEST_SLEEP": "0.05", "FASTDEPLOY_BATCH_SIZE": "4", "FASTDEPLOY_MAX_WAIT": "0",
        "FASTDEPLOY_LEASE_SECONDS": "2", "FASTDEPLOY_WEBHOOK_TIMEOUT": "2", **ALLOW_LOCAL_ENV,
    }
    with Receiver() as receiver, cluster(redis_url, apis=2, workers=2, env=env) as ((a, b), (w1, w2)):
        (w1_loop,) = w1.children()
        (w2_loop,) = w2.children()
        submitter = Submitter([a.url, b.url], receiver.url + "/ok")
        submitter.start()

        wait_done(receiver, 100)
        kill(w1_loop)  # the loop alone: its supervisor requeues its jobs and starts another
        submitter.wait_for(400)
        kill_service(b)  # a whole API server (supervisor and API process): clients move to the other one
        assert submitter.count() < JOBS
        wait_done(receiver, 300)
        kill_service(w2)  # the whole worker host: nobody requeues, its leases run out

        accepted = submitter.finish()
        wait_until(lambda: w1.children() and w1.children() != [w1_loop], 30, "worker 1's loop to be restarted")
        results = check_every_job(a.url, accepted, receiver, timeout=90)
        assert "exited with code -9" in w1.log()
        assert submitter.retries > 0, "some submissions should have met the dead API server"
        pids = loop_pids(results)
        assert {w1_loop, w2_loop} <= pids and len(pids) == 3, "jobs predicted by every loop, the restarted one too"
        assert len(ready_workers(a)) == 1 and a.get("/ready").status_code == 200
