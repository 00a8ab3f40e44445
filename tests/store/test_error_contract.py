"""One error contract on every backend: when the backend fails, public store methods raise
``StoreUnavailable`` (HTTP 503, with a reason) and nothing else; and the processes built on
the store (the prediction loop's heartbeat thread, the API service) live through it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fastdeploy.errors import StoreUnavailable
from fastdeploy.jobs import NewJob, Outcome, WorkerInfo, encode_inputs, new_job_id
from fastdeploy.loop import PredictionLoop
from fastdeploy.payloads import ParsedRequest
from fastdeploy.recipe import load_recipe
from fastdeploy.service import Service
from fastdeploy.settings import load_settings
from fastdeploy.store import open_backend
from fastdeploy.store.base import Store
from fastdeploy.store.sqlite import SQLiteStore
from tests.helpers import RECIPES, wait_until
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.timeout(60)

TABLES = ("jobs", "payloads", "workers", "webhooks")


def public_calls(store: Store) -> dict[str, Callable[[], Any]]:
    """Every public method of the store contract, called with plausible arguments."""
    info = WorkerInfo("w", 0, "host", 1, 4, True, time.time(), {"items": 1})
    return {
        "submit": lambda: store.submit([NewJob("fresh", encode_inputs([1]), 1, 9)]),
        "get": lambda: store.get(["a"]),
        "unfinished": store.unfinished,
        "unfinished_by_owner": store.unfinished_by_owner,
        "queue_depths": lambda: store.queue_depths(2),
        "cancel": lambda: store.cancel(["a"], "gone", 499),
        "claim": lambda: store.claim(0, 8, "w", 30),
        "finish": lambda: store.finish([Outcome("a", 0, result=b"[1]")], "w"),
        "heartbeat": lambda: store.heartbeat(info, 30),
        "workers": store.workers,
        "release_worker": lambda: store.release_worker("w"),
        "maintain": lambda: store.maintain(time.time(), 60, 60),
        "claim_webhooks": lambda: store.claim_webhooks(5, 30),
        "webhook_retry": lambda: store.webhook_retry("a", time.time()),
        "webhook_delivered": lambda: store.webhook_delivered("a"),
        "webhook_failed": lambda: store.webhook_failed("a"),
        "recent_failures": lambda: store.recent_failures(10),
        "outbox": store.outbox,
    }


def assert_all_unavailable(store: Store, expect_in_reason: str, before_each: Callable[[], None] = lambda: None,
                           spared: frozenset[str] = frozenset()) -> None:
    """Every public call raises StoreUnavailable, but those in ``spared``, which must not raise at all."""
    for name, call in public_calls(store).items():
        before_each()
        started = time.monotonic()
        if name in spared:
            call()
            continue
        with pytest.raises(StoreUnavailable) as caught:  # any other exception type fails the test
            call()
        assert type(caught.value) is StoreUnavailable, name
        assert time.monotonic() - started < 5, f"{name} took too long to fail"
        assert caught.value.status == 503, name
        assert expect_in_reason in caught.value.reason, f"{name}: {caught.value.reason!r}"


def raw_sqlite(state: Path) -> sqlite3.Connection:
    return sqlite3.connect(state / "jobs.sqlite3", timeout=10, isolation_level=None)


def seeded_sqlite(state: Path) -> SQLiteStore:
    store = SQLiteStore(state)
    store.submit([NewJob("a", encode_inputs(["x"]), 1, 9, None, "http://hook.example/x")])
    store.heartbeat(WorkerInfo("w", 0, "host", 1, 4, True, time.time(), {}), 30)
    return store


# -- SQLite -------------------------------------------------------------------------------


def test_sqlite_dropped_tables_fail_every_method_with_store_unavailable(tmp_path):
    state = tmp_path / "state"
    store = seeded_sqlite(state)
    try:
        db = raw_sqlite(state)
        for table in TABLES:
            db.execute(f"DROP TABLE {table}")
        db.close()
        assert_all_unavailable(store, "no such table")
        with pytest.raises(StoreUnavailable, match="no such table"):  # the non-blocking write as well
            store.submit([NewJob("c", b"x", 1, 9)], block=False)
    finally:
        store.close()


def test_sqlite_database_file_replaced_by_a_folder(tmp_path):
    """Works as root too (no permissions involved): a new connection cannot open a folder."""
    state = tmp_path / "state"
    store = seeded_sqlite(state)
    try:
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{state / 'jobs.sqlite3'}{suffix}")
            if path.exists():
                path.rename(f"{path}.moved")
        (state / "jobs.sqlite3").mkdir()
        # each thread opens its own connection: a fresh thread meets the folder
        with concurrent.futures.ThreadPoolExecutor(1) as fresh_thread:
            fresh_thread.submit(assert_all_unavailable, store, "unable to open database file").result()
        with pytest.raises(StoreUnavailable, match="unable to open database file"):
            SQLiteStore(state)
    finally:
        store.close()


def test_sqlite_garbage_in_the_file_header_fails_opening_with_store_unavailable(tmp_path):
    state = tmp_path / "state"
    seeded_sqlite(state).close()  # the last connection folds the WAL back into the file
    assert not Path(f"{state / 'jobs.sqlite3'}-wal").exists()
    with open(state / "jobs.sqlite3", "r+b") as file:
        file.write(b"\xa5" * 100)
    with pytest.raises(StoreUnavailable) as caught:
        SQLiteStore(state)
    assert caught.value.status == 503 and "file is not a database" in caught.value.reason


def test_sqlite_a_closed_store_raises_store_unavailable(tmp_path):
    store = seeded_sqlite(tmp_path / "state")
    store.close()
    assert_all_unavailable(store, "closed database")


def test_sqlite_a_store_recovers_once_its_tables_are_back(tmp_path):
    state = tmp_path / "state"
    store = seeded_sqlite(state)
    try:
        db = raw_sqlite(state)
        db.execute("DROP TABLE jobs")
        db.close()
        with pytest.raises(StoreUnavailable):
            store.submit([NewJob("b", b"x", 1, 9)])
        SQLiteStore(state).close()  # CREATE TABLE IF NOT EXISTS
        assert store.submit([NewJob("b", encode_inputs([2]), 1, 9)]) is True
        assert [c.id for c in store.claim(0, 8, "w", 30)] == ["b"]
    finally:
        store.close()


def test_sqlite_an_unreadable_worker_row_does_not_break_workers(tmp_path):
    state = tmp_path / "state"
    store = seeded_sqlite(state)
    try:
        db = raw_sqlite(state)
        db.execute("INSERT INTO workers VALUES ('mangled', 0, 'h', 1, 1, 1, ?, 'not json')", (time.time(),))
        db.close()
        assert [w.worker_id for w in store.workers()] == ["w"]  # like Redis: the unreadable record is skipped
    finally:
        store.close()


# -- Redis --------------------------------------------------------------------------------


@pytest.fixture
def redis_lib():
    return pytest.importorskip("redis", reason='the redis package is not installed: pip install "fastdeploy[redis]"')


@pytest.fixture
def private_redis(redis_lib) -> Iterator[PrivateRedis]:
    server = PrivateRedis().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.mark.redis
def test_redis_stopped_after_use_fails_every_method_quickly(private_redis):
    from fastdeploy.store.redis import RedisStore

    store = RedisStore(private_redis.url)
    try:
        store.submit([NewJob("a", encode_inputs(["x"]), 1, 9, None, "http://hook.example/x")])
        assert store.get(["a"])["a"].status.value == "queued"  # the pool holds a live connection now
        private_redis.stop()
        assert_all_unavailable(store, f"cannot reach Redis at 127.0.0.1:{private_redis.port}")
    finally:
        store.close()


@pytest.mark.redis
def test_redis_error_replies_are_store_unavailable_not_response_error(redis_url, redis_lib):
    """Keys of the wrong type make every command and script fail with an error reply
    (WRONGTYPE, "not an integer"): the store says StoreUnavailable, never redis.ResponseError. A job's or
    webhook's record (or a stage's lanes) of another type is no record, not a failure: the calls that read
    only those go on (anyone who can write to Redis could otherwise stop them for everyone)."""
    from fastdeploy.store.redis import RedisStore

    store = RedisStore(redis_url)
    raw = redis_lib.Redis.from_url(redis_url.split("?")[0])
    keys = store.keys
    broken = [*keys.script_keys(), keys.job("a"), keys.job("b"), keys.lanes(0), keys.lanes(1), keys.held("w"),
              keys.hook("a")]

    def break_keys() -> None:  # again before each call: a failed MULTI may still have deleted some
        for key in broken:
            raw.set(key, "not-the-right-type")

    try:
        assert_all_unavailable(store, f"Redis at {store.address} failed", before_each=break_keys,
                               spared=frozenset({"get", "queue_depths", "cancel", "finish", "webhook_retry"}))
        break_keys()
        with pytest.raises(StoreUnavailable, match="not an integer"):  # the submit script's INCRBY on seq
            store.submit([NewJob("c", b"x", 1, 9)])
    finally:
        raw.delete(*broken)
        raw.close()
        store.close()


@pytest.mark.redis
def test_redis_out_of_memory_fails_writes_with_store_unavailable_and_recovers(private_redis, redis_lib):
    from fastdeploy.store.redis import RedisStore

    store = RedisStore(private_redis.url)
    admin = redis_lib.Redis.from_url(private_redis.url)
    try:
        store.submit([NewJob("a", encode_inputs(["x"]), 1, 9)])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        info = WorkerInfo("w", 0, "host", 1, 4, True, time.time(), {})
        for write in (lambda: store.submit([NewJob("b", b"x", 1, 9)]), lambda: store.heartbeat(info, 30),
                      lambda: store.maintain(time.time(), 60, 60)):
            with pytest.raises(StoreUnavailable) as caught:
                write()
            assert caught.value.status == 503 and "maxmemory" in caught.value.reason
        # reads still work, and nothing half-written shows
        assert set(store.get(["a", "b"])) == {"a"}
        assert store.queue_depths(1) == [1] and store.workers() == []
        admin.config_set("maxmemory", 0)
        assert store.submit([NewJob("b", encode_inputs(["y"]), 1, 9)]) is True
        assert [c.id for c in store.claim(0, 8, "w", 30)] == ["a", "b"]
    finally:
        admin.close()
        store.close()


# -- the prediction loop's heartbeat thread -----------------------------------------------


@pytest.fixture
def thread_env(monkeypatch):
    """The loop sets the BLAS thread variables with setdefault: keep the test process's own."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))


def listed(store: Store, worker_id: str, after: float = 0.0) -> list[WorkerInfo]:
    try:
        return [w for w in store.workers() if w.worker_id == worker_id and w.seen > after]
    except StoreUnavailable:
        return []


@pytest.fixture
def echo_loop(tmp_path, thread_env) -> Iterator[tuple[PredictionLoop, threading.Thread, Path]]:
    """An echo loop serving a SQLite store on a thread (heartbeat every 0.1 s)."""
    settings = load_settings(RECIPES / "echo", {
        "state_dir": str(tmp_path / "state"), "heartbeat_seconds": "0.1", "batch_size": "4", "spin_us": "0",
    }, environ={})
    backend = open_backend("", settings.state_path, 0.0)
    loop = PredictionLoop(settings, load_recipe(RECIPES / "echo"), 0, f"hb-{uuid.uuid4().hex[:6]}",
                          backend.store, backend.doorbell)
    thread = threading.Thread(target=loop.run, name="loop-under-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: loop.ready, what="the loop ready")
        yield loop, thread, settings.state_path
    finally:
        loop.stop()
        thread.join(timeout=10)
        backend.close()
        assert not thread.is_alive()


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "heartbeat" and t.is_alive()]


def count_heartbeats(loop: PredictionLoop, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the loop's heartbeat writes, and those that raised (whatever the exception)."""
    counts = {"tried": 0, "failed": 0}
    original = loop.store.heartbeat

    def counted(*args: Any, **kwargs: Any) -> None:
        counts["tried"] += 1
        try:
            original(*args, **kwargs)
        except BaseException:
            counts["failed"] += 1
            raise

    monkeypatch.setattr(loop.store, "heartbeat", counted)
    return counts


def test_the_heartbeat_thread_survives_a_broken_store_and_beats_again_once_repaired(echo_loop, monkeypatch):
    """A store failure (here: the workers table gone; in the field: a full disk) must not end
    the heartbeat thread, or the loop is never listed again and /ready stays 503."""
    loop, thread, state = echo_loop
    observer = SQLiteStore(state)
    try:
        wait_until(lambda: listed(observer, loop.worker_id), what="the worker listed")
        beats = count_heartbeats(loop, monkeypatch)
        db = raw_sqlite(state)
        db.execute("DROP TABLE workers")
        db.close()

        wait_until(lambda: beats["failed"] >= 3, what="three failed heartbeats (the heartbeat thread died?)")
        assert len(heartbeat_threads()) == 1 and thread.is_alive()

        repaired_at = time.time()
        SQLiteStore(state).close()  # CREATE TABLE IF NOT EXISTS: the table is back, empty
        (worker,) = wait_until(lambda: listed(observer, loop.worker_id, after=repaired_at),
                               what="a heartbeat after repair")
        assert worker.ready and worker.batch_size == 4

        # and the loop still serves
        job_id = new_job_id()
        observer.submit([NewJob(job_id, encode_inputs(["still here"]), 1, 5)])
        view = wait_until(lambda: observer.get([job_id])[job_id].status.finished and observer.get([job_id])[job_id],
                          what="the job done")
        assert view.result == b'["still here"]'
    finally:
        observer.close()


def test_the_heartbeat_thread_survives_an_unexpected_error(echo_loop, monkeypatch):
    """Not a store error at all (stats the store cannot encode: TypeError): the thread logs it and keeps beating."""
    loop, thread, state = echo_loop
    observer = SQLiteStore(state)
    try:
        beats = count_heartbeats(loop, monkeypatch)
        loop.doorbell.stats["unencodable"] = object()
        wait_until(lambda: beats["failed"] >= 3, what="three failed heartbeats (the heartbeat thread died?)")
        del loop.doorbell.stats["unencodable"]
        fixed_at = time.time()
        wait_until(lambda: listed(observer, loop.worker_id, after=fixed_at), what="a heartbeat after the error")
        assert len(heartbeat_threads()) == 1 and thread.is_alive()
    finally:
        observer.close()


# -- the API service on a broken store ---------------------------------------------------


def test_the_service_reports_a_broken_store_as_503_and_recovers(tmp_path):
    settings = load_settings(RECIPES / "echo", {"state_dir": str(tmp_path / "state"), "timeout": "10"}, environ={})
    recipe = load_recipe(RECIPES / "echo")
    backend = open_backend("", settings.state_path, 0.0)
    request = ParsedRequest([1], None, 9, None)

    async def scenario() -> None:
        service = Service(settings, recipe, backend.store, backend.doorbell)
        await service.start()
        try:
            db = raw_sqlite(settings.state_path)
            db.execute("DROP TABLE jobs")
            db.close()
            # before any refresh notices: the failed write itself answers 503, at once
            for attempt in (service.submit_async(request), service.predict_sync(ParsedRequest([1], None, 8, None))):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="no such table: jobs"):
                    await attempt
                assert time.monotonic() - started < 5
            with pytest.raises(StoreUnavailable):
                await service.result("whatever")
            await service.refresh()
            assert "no such table" in (service.not_ready_reason() or "")
            with pytest.raises(StoreUnavailable) as caught:  # refused up front now
                await service.submit_async(request)
            assert caught.value.retry_after is not None

            SQLiteStore(settings.state_path).close()  # tables back
            await service.refresh()
            assert "no such table" not in (service.not_ready_reason() or "")
            job_id = await service.submit_async(request)
            assert (await service.result(job_id)).status == 200
        finally:
            await service.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        backend.close()
