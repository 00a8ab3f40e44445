"""What only the Redis store does: URL prefixes, key TTLs, and behaviour when Redis goes away."""

from __future__ import annotations

import time

import pytest

from fastdeploy.errors import StoreUnavailable
from fastdeploy.jobs import NewJob, Outcome, WorkerInfo
from fastdeploy.store import open_store
from tests.redis_server import PrivateRedis, _free_port

pytestmark = pytest.mark.redis
redis_module = pytest.importorskip("redis", reason='the redis package is not installed: pip install "fastdeploy[redis]"')

from fastdeploy.store.redis import DEFAULT_PREFIX, Keys, RedisStore  # noqa: E402
from fastdeploy.store.redis_doorbell import RedisDoorbell  # noqa: E402


def job(job_id: str, webhook: str | None = None) -> NewJob:
    return NewJob(job_id, b"x", 1, 9, None, webhook)


def test_open_store_picks_redis_for_a_redis_url(redis_url):
    store = open_store(redis_url)
    try:
        assert isinstance(store, RedisStore)
    finally:
        store.close()


def test_prefix_comes_from_the_url():
    assert RedisStore("redis://127.0.0.1:1/0").keys.prefix == DEFAULT_PREFIX
    store = RedisStore("redis://127.0.0.1:1/3?prefix=shop&socket_keepalive=true")
    assert store.keys.prefix == "shop" and store.keys.job("a") == "shop:job:a"
    assert store._redis.connection_pool.connection_kwargs["db"] == 3


def test_every_key_is_under_the_prefix():
    keys = Keys("p")
    names = keys.script_keys() + keys.script_prefixes() + [keys.job("a"), keys.queue(1), keys.held("w"),
                                                           keys.bell(0), keys.hook("a")]
    assert all(name.startswith("p:") for name in names)


def test_two_prefixes_on_one_redis_do_not_share_jobs(redis_base_url):
    first = RedisStore(redis_base_url + "?prefix=fdtest-one-" + str(time.time_ns()))
    second = RedisStore(redis_base_url + "?prefix=fdtest-two-" + str(time.time_ns()))
    try:
        first.submit([job("a")])
        assert second.get(["a"]) == {} and second.claim(0, 8, "w", 30) == []
        assert [c.id for c in first.claim(0, 8, "w", 30)] == ["a"]
    finally:
        for store in (first, second):
            store.delete_all()
            store.close()


def test_finished_jobs_get_a_redis_ttl(redis_url):
    store = RedisStore(redis_url)
    client = store._redis
    try:
        store.maintain(time.time(), 120, 60)  # an API server's maintenance publishes the TTL
        store.submit([job("a", webhook="http://h/x"), job("b")])
        assert client.pttl(store.keys.job("a")) == -1  # unfinished: kept until done
        store.claim(0, 8, "w", 30)
        store.finish([Outcome("a", 0, result=b"[1]"), Outcome("b", 0, reason="bad")], "w")
        for job_id in ("a", "b"):
            ttl = client.pttl(store.keys.job(job_id))
            assert 0 < ttl <= 120_000
            assert client.hget(store.keys.job(job_id), "payload") is None  # inputs are dropped at once
        store.maintain(time.time() + 200, 120, 60)
        assert client.exists(store.keys.job("a"), store.keys.hook("a")) == 0
        assert client.zcard(store.keys.finished) == 0 and client.zcard(store.keys.outbox) == 0
    finally:
        store.close()


def test_an_unreachable_redis_is_a_clear_503_not_a_hang():
    port = _free_port()  # nothing listens here
    store = RedisStore(f"redis://127.0.0.1:{port}/0")
    bell = RedisDoorbell(f"redis://127.0.0.1:{port}/0")
    info = WorkerInfo("w", 0, "h", 1, 1, True, time.time(), {})
    calls = [
        lambda: store.submit([job("a")]),
        lambda: store.get(["a"]),
        store.unfinished,
        lambda: store.queue_depths(2),
        lambda: store.claim(0, 8, "w", 30),
        lambda: store.finish([Outcome("a", 0, result=b"[]")], "w"),
        lambda: store.heartbeat(info, 30),
        store.workers,
        lambda: store.release_worker("w"),
        lambda: store.maintain(time.time(), 60, 60),
        lambda: store.claim_webhooks(5, 30),
        lambda: store.webhook_delivered("a"),
        lambda: store.webhook_retry("a", time.time()),
    ]
    try:
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                call()
            assert time.monotonic() - started < 5
            assert caught.value.status == 503
            assert f"cannot reach Redis at 127.0.0.1:{port}" in caught.value.reason
        # doorbells are hints: they wait out their timeout instead of failing
        bell.listen_for_results()
        started = time.monotonic()
        assert bell.wait_for_results(0.2) == []
        bell.wait_for_jobs(0, 0.2)
        assert time.monotonic() - started < 5
    finally:
        store.close()
        bell.close()


def test_the_store_recovers_when_redis_restarts():
    server = PrivateRedis(persistent=True).start()
    store = RedisStore(server.url)
    listener = RedisDoorbell(server.url)
    try:
        listener.listen_for_results()
        store.submit([NewJob("before", b"x", 1, 9, None, None, listener.address)])
        server.stop()
        with pytest.raises(StoreUnavailable, match="cannot reach Redis"):
            store.claim(0, 8, "w", 30)
        assert listener.wait_for_results(0.1) == []
        server.start()
        (claimed,) = store.claim(0, 8, "w", 30)  # the queued job survived (appendonly) and the pool reconnects
        assert claimed.id == "before"
        store.finish([Outcome("before", 0, result=b"[1]")], "w")
        # the listener resubscribes on its own; a ring published before that is lost (the API polls), so ring again
        heard: list[str] = []
        deadline = time.monotonic() + 10
        n = 0
        while not heard and time.monotonic() < deadline:
            n += 1
            store.submit([NewJob(f"after{n}", b"x", 1, 9, None, None, listener.address)])
            store.claim(0, 8, "w", 30)
            store.finish([Outcome(f"after{n}", 0, result=b"[1]")], "w")
            heard = listener.wait_for_results(0.5)
        assert heard
    finally:
        store.close()
        listener.close()
        server.cleanup()


def test_nothing_is_left_behind_once_results_expire(redis_url):
    """Steady load leaves no per-job keys once results expire: memory does not grow without bound.
    A job expires by its key's TTL, on Redis's own clock (only a webhook's record needs the sweep)."""
    store = RedisStore(redis_url)
    try:
        store.maintain(time.time(), 1, 60)
        for round_ in range(5):
            batch = [job(f"r{round_}-{i}", webhook="http://h/x" if i % 2 else None) for i in range(40)]
            store.submit(batch)
            store.heartbeat(WorkerInfo("w", 0, "h", 1, 8, True, time.time(), {}), 30)
            while claimed := store.claim(0, 8, "w", 30):
                store.finish([Outcome(c.id, 0, result=b"[1]") for c in claimed], "w")
            for delivery in store.claim_webhooks(100, 30):
                store.webhook_delivered(delivery.job_id)
        store.release_worker("w")
        time.sleep(1.1)
        store.maintain(time.time(), 1, 60)
        left = {key.decode().removeprefix(store.keys.prefix + ":") for key in store._redis.scan_iter(store.keys.pattern())}
        assert left <= {"seq", "config", "stages", "bell:0", "tallies", "failures"}, left  # counters, settings, the last 50 failures; the bell expires by itself
        assert store._redis.ttl(store.keys.bell(0)) > 0
    finally:
        store.close()



def _owned(job_id: str, owner: str) -> NewJob:
    return NewJob(job_id, b"x", 1, 9, None, None, None, owner)


def test_an_owners_failures_list_is_bounded_and_expires_with_the_results(redis_url):
    """Kept per owner so another key's flood does not push them out, and gone once the owner is: keys of
    owners that stopped coming do not pile up."""
    store = RedisStore(redis_url)
    try:
        store.maintain(time.time(), 120, 60)
        store.submit([_owned(f"b{i}", "key-b") for i in range(60)])
        store.finish([Outcome(c.id, 0, reason="bad") for c in store.claim(0, 100, "w", 30)], "w")
        assert store._redis.llen(store.keys.failed("key-b")) == 50
        assert 0 < store._redis.ttl(store.keys.failed("key-b")) <= 120
    finally:
        store.close()


def test_the_counts_behind_the_per_key_bound_are_put_right_by_maintenance(redis_url):
    """The submit script checks the bound against counts kept job by job; maintenance recounts them from
    the lanes and leases, so a count gone astray (keys deleted by hand, jobs of an earlier version) heals,
    and an owner with nothing unfinished leaves nothing behind."""
    from fastdeploy.errors import OwnerLimitReached

    store = RedisStore(redis_url)
    try:
        store.submit([_owned("a1", "key-a"), _owned("a2", "key-a")], owner_limit=2)
        store._redis.hset(store.keys.owned, "key-a", 0)  # astray: the next submit would pass the bound
        store.maintain(time.time(), 60, 60)
        with pytest.raises(OwnerLimitReached):
            store.submit([_owned("a3", "key-a")], owner_limit=2)
        store._redis.hset(store.keys.owned, "key-a", 99)  # astray the other way: key-a would be shut out
        store.maintain(time.time(), 60, 60)
        store.cancel(["a1", "a2"], "cancelled", 409)
        store.submit([_owned("a3", "key-a"), _owned("a4", "key-a")], owner_limit=2)
        store.cancel(["a3", "a4"], "cancelled", 409)
        assert store._redis.exists(store.keys.owned) == 0
    finally:
        store.close()


def test_a_count_that_is_not_a_number_never_breaks_a_submit_or_a_finish(redis_url):
    """Whoever can write to Redis is untrusted: a mangled count is dropped, and the recount restores it."""
    store = RedisStore(redis_url)
    try:
        store.submit([_owned("a1", "key-a")], owner_limit=5)
        store._redis.hset(store.keys.owned, "key-a", "lots")
        store.submit([_owned("a2", "key-a")], owner_limit=5)
        store.finish([Outcome(c.id, 0, result=b"[1]") for c in store.claim(0, 8, "w", 30)], "w")
        store.maintain(time.time(), 60, 60)
        assert store._redis.hgetall(store.keys.owned) == {}
    finally:
        store.close()


def test_jobs_an_earlier_version_queued_per_stage_are_claimed_after_the_upgrade(redis_url):
    """Issue #25 point 4: the per-stage queues of the version before fair share, moved into lanes in order."""
    from tests.old_redis_layout import write_old_queue

    write_old_queue(redis_url, [("old-1", [1]), ("old-2", [2, 3]), ("old-3", [4])])
    store = RedisStore(redis_url)
    try:
        assert store.claim(0, 8, "w1", 30) == []  # not seen before the upgrade
        assert store.upgrade() == 3
        assert store.upgrade() == 0  # once
        assert [job.id for job in store.claim(0, 8, "w1", 30)] == ["old-1", "old-2", "old-3"]
        assert store.unfinished() == 3
        store.finish([Outcome(job_id, 0, result=b"[1]") for job_id in ("old-1", "old-2", "old-3")], "w1")
        assert store.unfinished() == 0
    finally:
        store.close()
