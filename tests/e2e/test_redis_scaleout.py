"""Scale-out on Redis: API servers and workers as separate processes sharing one Redis.

Every process here is the real CLI (`fastdeploy serve` / `fastdeploy worker`) started by
tests/helpers.py. Faults are real too: SIGKILL and SIGSTOP on worker and API processes, and
a private redis-server stopped and restarted (never the shared one on 6379).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import pytest
import requests

from tests.helpers import TEST_RECIPES, Server, serve
from tests.redis_server import PrivateRedis, delete_prefix
from tests.webhook_receiver import ALLOW_LOCAL_ENV, Receiver

pytestmark = pytest.mark.redis

RECIPE = TEST_RECIPES / "scaleout"
T = TypeVar("T")


# -- helpers ----------------------------------------------------------------------------
def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except requests.RequestException:
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def ready_workers(server: Server, stage: Optional[int] = None) -> list[dict[str, Any]]:
    meta = server.get("/meta").json()
    return [w for s in meta["stages"] if stage is None or s["stage"] == stage for w in s["workers"] if w["ready"]]


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def loop_pid(worker: Server) -> int:
    (pid,) = worker.children()  # one stage, one replica: one loop process
    return pid


@contextmanager
def cluster(
    broker: str,
    *,
    apis: int = 2,
    workers: int = 2,
    env: Optional[dict[str, str]] = None,
    api_recipes: Optional[Sequence[Path]] = None,
) -> Iterator[tuple[list[Server], list[Server]]]:
    """Start `workers` worker processes, then `apis` API servers, all on one broker."""
    full_env = {"FASTDEPLOY_BROKER": broker, **(env or {})}
    with ExitStack() as stack:
        worker_servers = [
            stack.enter_context(serve(RECIPE, command="worker", env=full_env, ready=False)) for _ in range(workers)
        ]
        recipes = list(api_recipes or [RECIPE] * apis)
        api_servers = [
            stack.enter_context(serve(recipe, command="serve", env=full_env, ready_timeout=120)) for recipe in recipes
        ]
        wait_until(lambda: len(ready_workers(api_servers[0])) == workers, 120, f"{workers} ready workers in /meta")
        yield api_servers, worker_servers


def submit(server: Server, data: list[Any], **extra: Any) -> str:
    response = server.post("/async", {"data": data, **extra})
    assert response.status_code == 200, response.text
    return response.json()["unique_id"]


def all_done(server: Server, ids: Sequence[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
    """Wait until every id is finished; returns the /result bodies."""
    results: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        for unique_id in ids:
            if unique_id not in results:
                body = server.post("/result", {"unique_id": unique_id}).json()
                if body["status"] in ("done", "failed"):
                    results[unique_id] = body
        return len(results) == len(ids)

    wait_until(finished, timeout, f"{len(ids)} jobs to finish", interval=0.2)
    return results


def in_flight(log: Path, pid: int) -> list[Any]:
    """Inputs of batches `pid` started but has not ended."""
    started: list[Any] = []
    for call in calls(log):
        if call["pid"] != pid:
            continue
        if call["phase"] == "start":
            started.extend(call["inputs"])
        else:
            for x in call["inputs"]:
                started.remove(x)
    return started


# -- two API servers, two workers ------------------------------------------------------------
@pytest.fixture(scope="module")
def shared(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[Server], list[Server]]]:
    """Two workers and two API servers; the second API server's recipe copy cannot even import its predictor."""
    url = f"{redis_base_url}?prefix=fdtest-{uuid.uuid4().hex[:12]}"
    api_only = tmp_path_factory.mktemp("api-only") / "scaleout"
    shutil.copytree(RECIPE, api_only)
    (api_only / "predictor.py").write_text('raise ImportError("an API server must never import the predictor")\n')
    env = {"FD_TEST_SLEEP": "0.2", "FASTDEPLOY_MAX_BATCH_SIZE": "8", **ALLOW_LOCAL_ENV}
    try:
        with cluster(url, env=env, api_recipes=[RECIPE, api_only]) as nodes:
            yield nodes
    finally:
        delete_prefix(url)


def test_submit_on_one_server_read_on_the_other(shared):
    (a, b), _ = shared
    first = submit(a, [1, "two"])
    second = submit(b, [{"three": 3}])
    for unique_id, data in ((first, [1, "two"]), (second, [{"three": 3}])):
        for server in (a, b):
            body = server.wait_result(unique_id)
            assert body["status"] == "done" and body["success"] is True
            assert [p["echo"] for p in body["prediction"]] == data
    for server in (a, b):
        missing = server.post("/result", {"unique_id": "no-such-job"})
        assert missing.status_code == 404 and missing.json()["status"] == "not_found"


def test_sync_waits_are_answered_where_taken_and_both_workers_predict(shared):
    (a, b), workers = shared

    def send(i: int) -> requests.Response:
        return (a if i % 2 else b).post("/sync", {"data": [f"s{i}"]})

    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(send, range(40)))
    assert [r.status_code for r in responses] == [200] * 40
    pids = set()
    for i, response in enumerate(responses):
        (prediction,) = response.json()["prediction"]
        assert prediction["echo"] == f"s{i}"
        pids.add(prediction["pid"])
    assert pids == {loop_pid(w) for w in workers}, "both workers should have predicted part of the load"


def test_meta_and_metrics_show_every_worker_on_every_server(shared):
    (a, b), workers = shared
    pids = {loop_pid(w) for w in workers}
    for server in (a, b):
        meta = server.get("/meta").json()
        (stage,) = meta["stages"]
        assert {w["pid"] for w in stage["workers"]} == pids
        assert all(isinstance(w["batch_size"], int) and 1 <= w["batch_size"] <= 8 for w in stage["workers"])
        assert stage["batch_size"] is not None and "queue_depth" in stage
        metrics = server.get("/metrics").text
        assert 'fastdeploy_workers{stage="0"} 2.0' in metrics
        assert 'fastdeploy_queue_depth{stage="0"}' in metrics
        assert metrics.count("fastdeploy_worker_batch_size{") == 2


def test_queue_depth_shows_a_backlog_on_any_server(shared):
    (a, b), _ = shared
    ids = [submit(a, [f"q{i}"], priority=9) for i in range(160)]  # about 2 s of work for both workers

    def depth() -> float:
        for line in b.get("/metrics").text.splitlines():
            if line.startswith('fastdeploy_queue_depth{stage="0"}'):
                return float(line.split()[-1])
        raise AssertionError("no queue depth metric")

    seen = wait_until(lambda: depth() > 0, 10, "a queue depth above 0 on the other server", interval=0.05)
    assert seen
    all_done(b, ids)
    wait_until(lambda: depth() == 0, 10, "the queue depth back to 0")


def test_webhooks_are_sent_once_per_job(shared):
    (a, b), _ = shared
    with Receiver() as receiver:
        ids = [submit(a if i % 2 else b, [i], webhook=receiver.url + "/ok") for i in range(20)]
        receiver.wait_for("/ok", 20, timeout=60)
        all_done(a, ids)
        time.sleep(1.5)  # both API servers run a sender: give a duplicate the chance to show up
        posts = receiver.received("/ok")
        assert sorted(p["unique_id"] for p in posts) == sorted(ids)


# -- faults -------------------------------------------------------------------------------------
SLOW = {"FD_TEST_SLEEP": "1.5", "FASTDEPLOY_BATCH_SIZE": "4", "FASTDEPLOY_MAX_WAIT": "0", **ALLOW_LOCAL_ENV}


def test_worker_killed_mid_batch_loses_nothing(redis_url, tmp_path):
    log = tmp_path / "calls.jsonl"
    with Receiver() as receiver, cluster(redis_url, apis=1, env={**SLOW, "FD_TEST_LOG": str(log)}) as ([api], workers):
        ids = [submit(api, [f"job{i}"], webhook=receiver.url + "/ok") for i in range(16)]
        pids = {loop_pid(w): w for w in workers}
        busy = wait_until(lambda: [p for p in pids if in_flight(log, p)], 30, "a worker in the middle of a batch")
        victim_pid = busy[0]
        victim = pids[victim_pid]
        (survivor_pid,) = set(pids) - {victim_pid}
        # the whole worker host dies at once: its supervisor cannot requeue anything
        os.kill(victim.proc.pid, signal.SIGKILL)
        os.kill(victim_pid, signal.SIGKILL)
        lost = in_flight(log, victim_pid)
        assert lost, "the victim should have died holding a batch"

        results = all_done(api, ids, timeout=120)
        for i, unique_id in enumerate(ids):
            body = results[unique_id]
            assert body["status"] == "done", body
            assert [p["echo"] for p in body["prediction"]] == [f"job{i}"]
        for x in lost:  # the batch the victim held was predicted again by the survivor
            (body,) = [results[u] for i, u in enumerate(ids) if f"job{i}" == x]
            assert body["prediction"][0]["pid"] == survivor_pid
        receiver.wait_for("/ok", 16, timeout=60)
        time.sleep(1.0)
        assert sorted(p["unique_id"] for p in receiver.received("/ok")) == sorted(ids)
        wait_until(lambda: [w["pid"] for w in ready_workers(api)] == [survivor_pid], 30, "the dead worker gone from /meta")


def test_a_job_predicted_twice_is_delivered_once(redis_url, tmp_path):
    """A worker frozen mid-batch (SIGSTOP) loses its jobs to another, then wakes up and finishes them too."""
    log = tmp_path / "calls.jsonl"
    with Receiver() as receiver, cluster(redis_url, apis=1, env={**SLOW, "FD_TEST_LOG": str(log)}) as ([api], workers):
        ids = [submit(api, [f"job{i}"], webhook=receiver.url + "/ok") for i in range(8)]
        pids = [loop_pid(w) for w in workers]
        busy = wait_until(lambda: [p for p in pids if in_flight(log, p)], 30, "a worker in the middle of a batch")
        victim_pid = busy[0]
        (survivor_pid,) = set(pids) - {victim_pid}
        os.kill(victim_pid, signal.SIGSTOP)
        try:
            held = in_flight(log, victim_pid)
            assert held
            held_ids = [u for i, u in enumerate(ids) if f"job{i}" in held]
            results = all_done(api, held_ids, timeout=60)  # requeued once its heartbeat stopped
            assert all(results[u]["prediction"][0]["pid"] == survivor_pid for u in held_ids)
        finally:
            os.kill(victim_pid, signal.SIGCONT)
        wait_until(lambda: not in_flight(log, victim_pid), 30, "the frozen worker to finish its batch as well")
        results = all_done(api, ids)
        assert all(results[u]["prediction"][0]["pid"] == survivor_pid for u in held_ids)  # first outcome won
        receiver.wait_for("/ok", 8, timeout=60)
        time.sleep(1.5)
        posts = receiver.received("/ok")
        assert sorted(p["unique_id"] for p in posts) == sorted(ids)
        assert all(p["prediction"][0]["pid"] == survivor_pid for p in posts if p["unique_id"] in held_ids)


def test_api_server_killed_after_accepting_jobs_loses_none(redis_url, tmp_path):
    env = {"FD_TEST_SLEEP": "0.5", "FASTDEPLOY_BATCH_SIZE": "4", "FASTDEPLOY_MAX_WAIT": "0"}
    with cluster(redis_url, apis=2, workers=1, env=env) as ((a, b), _):
        ids = [submit(a, [f"job{i}"]) for i in range(12)]
        api_pids = a.children()
        os.kill(a.proc.pid, signal.SIGKILL)
        for pid in api_pids:
            os.kill(pid, signal.SIGKILL)
        results = all_done(b, ids, timeout=120)
        assert all(results[u]["status"] == "done" for u in ids)
        assert [[p["echo"] for p in results[u]["prediction"]] for u in ids] == [[f"job{i}"] for i in range(12)]
        assert b.get("/ready").status_code == 200


def test_redis_outage_is_a_clear_503_and_everything_recovers(tmp_path):
    log = tmp_path / "calls.jsonl"
    redis_server = PrivateRedis(persistent=True).start()  # never the shared one: this test stops it
    env = {"FD_TEST_SLEEP": "1.5", "FASTDEPLOY_BATCH_SIZE": "4", "FD_TEST_LOG": str(log)}
    try:
        with cluster(redis_server.url, apis=1, workers=1, env=env) as ([api], [worker]):
            assert api.post("/sync", {"data": ["before"]}).status_code == 200
            pending = submit(api, ["during"])
            wait_until(lambda: in_flight(log, loop_pid(worker)) == ["during"], 30, "the job in the predictor")
            redis_server.stop()

            started = time.monotonic()
            refused = api.post("/async", {"data": [1]}, timeout=20)
            assert time.monotonic() - started < 10, "a Redis outage must not make requests hang"
            assert refused.status_code == 503 and refused.headers.get("Retry-After")
            assert refused.json()["success"] is False and "Redis" in refused.json()["reason"]
            assert "Traceback" not in refused.text
            sync = api.post("/sync", {"data": [1]}, timeout=20)
            assert sync.status_code == 503 and "Redis" in sync.json()["reason"]
            result = api.post("/result", {"unique_id": pending}, timeout=20)
            assert result.status_code == 503 and "Redis" in result.json()["reason"]
            def outage_reason() -> str:
                response = api.get("/ready")
                return response.json()["reason"] if response.status_code == 503 else ""

            reason = wait_until(lambda: "Redis" in outage_reason() and outage_reason(), 20, "/ready to report the outage")
            assert f"cannot reach Redis at 127.0.0.1:{redis_server.port}" in reason
            assert api.get("/health").status_code == 200

            # the predictor finishes during the outage: its outcome must wait, not vanish
            wait_until(lambda: "cannot record 1 outcome(s)" in worker.log(), 30, "the worker to retry its outcome")
            redis_server.start()
            wait_until(lambda: api.get("/ready").status_code == 200, 60, "/ready after Redis came back")
            body = api.wait_result(pending, timeout=60)  # the outcome was retried, not lost
            assert body["status"] == "done" and body["prediction"][0]["echo"] == "during"
            again = api.post("/sync", {"data": ["after"]})
            assert again.status_code == 200 and again.json()["prediction"][0]["echo"] == "after"
            assert len(ready_workers(api)) == 1
    finally:
        redis_server.cleanup()


def test_workers_for_single_stages_of_a_chain(redis_url):
    env = {"FASTDEPLOY_BROKER": redis_url, "FASTDEPLOY_STORE_SECRET": "0123456789abcdef" * 4}
    chain = TEST_RECIPES / "chain"
    with ExitStack() as stack:
        for stage in (0, 1):
            stack.enter_context(serve(chain, command="worker", args=["--stage", str(stage)], env=env, ready=False))
        api = stack.enter_context(serve(chain, command="serve", env=env, ready_timeout=120))
        for stage in (0, 1):
            assert len(ready_workers(api, stage)) == 1
        body = api.post("/sync", {"data": [1, 2]}).json()
        assert [(p["input"], p["double"]) for p in body["prediction"]] == [(1, 2), (2, 4)]


def test_run_with_a_broker_flag_joins_other_workers(redis_url):
    with serve(RECIPE, command="worker", args=["--broker", redis_url], ready=False) as worker, \
            serve(RECIPE, command="run", args=["--broker", redis_url], ready_timeout=120) as both:
        pids = wait_until(lambda: {w["pid"] for w in ready_workers(both)} if len(ready_workers(both)) == 2 else None,
                          120, "the run command's loop and the separate worker in /meta")
        assert loop_pid(worker) in pids
        assert [p["echo"] for p in both.post("/sync", {"data": [1, 2, 3]}).json()["prediction"]] == [1, 2, 3]
