"""The store contract (fastdeploy/store/base.py), run on every backend: embedded SQLite and Redis.

Time-dependent behaviour (leases, silent workers, result expiry) is driven through the
``now`` that maintain() receives, so nothing here sleeps for a lease to run out.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Optional

import orjson
import pytest

from fastdeploy.jobs import TIMED_OUT_REASON, JobState, JobStatus, JobView, NewJob, Outcome, WebhookState, WorkerInfo
from fastdeploy.store.base import MAX_ATTEMPTS, Outbox, Store

FAR = 1e9  # a worker timeout or TTL that never triggers


def job(job_id: str, n_items: int = 1, priority: int = 9, deadline: Optional[float] = None,
        webhook: Optional[str] = None, origin: Optional[str] = None) -> NewJob:
    return NewJob(job_id, b"payload-" + job_id.encode(), n_items, priority, deadline, webhook, origin)


def news_ids(news) -> set[str]:
    """Ids named by result news, whether the outcome came with it or not."""
    return {item.id if isinstance(item, JobView) else item for item in news}


def ids(claimed) -> list[str]:
    return [c.id for c in claimed]


def status(store: Store, job_id: str) -> Optional[JobStatus]:
    view = store.get([job_id]).get(job_id)
    return None if view is None else view.status


def done(job_id: str, stage: int = 0, value: object = "ok") -> Outcome:
    return Outcome(job_id, stage, result=orjson.dumps([value]))


def info(worker_id: str, stage: int = 0, seen: Optional[float] = None, **stats: object) -> WorkerInfo:
    return WorkerInfo(worker_id, stage, "host-a", 4242, 8, True, time.time() if seen is None else seen, dict(stats))


# -- submit and read ------------------------------------------------------------------
def test_submit_then_get(store):
    store.submit([job("a"), job("b", n_items=3)])
    views = store.get(["a", "b", "unknown"])
    assert set(views) == {"a", "b"}
    assert views["a"].status is JobStatus.QUEUED and views["a"].result is None
    assert store.get([]) == {}
    store.submit([])  # nothing to do, no error


def test_states_tell_status_and_owner_without_the_result(store):
    store.submit([NewJob("a", b"p", 1, 9, owner="key:a"), NewJob("b", b"p", 1, 9)])
    store.claim(0, 1, "w1", 30)
    store.finish([Outcome("a", 0, result=b'["' + b"x" * 100 + b'"]')], "w1")
    states = store.states(["a", "b", "unknown"])
    assert states == {"a": JobState(JobStatus.DONE, "key:a"), "b": JobState(JobStatus.QUEUED, "")}
    assert store.states([]) == {}


def test_claim_returns_payload_and_marks_processing(store):
    deadline = time.time() + 60
    store.submit([job("a", n_items=2, deadline=deadline)])
    (claimed,) = store.claim(0, 8, "w1", 30)
    assert (claimed.id, claimed.stage, claimed.payload, claimed.n_items) == ("a", 0, b"payload-a", 2)
    assert abs(claimed.deadline - deadline) < 1e-3
    assert status(store, "a") is JobStatus.PROCESSING
    assert store.claim(0, 8, "w2", 30) == []


def test_claim_in_priority_order_then_fifo(store):
    store.submit([job("p9a", priority=9), job("p9b", priority=9), job("p1a", priority=1)])
    store.submit([job("p5", priority=5), job("p1b", priority=1), job("p0", priority=0)])
    order = []
    while claimed := store.claim(0, 1, "w1", 30):
        order += ids(claimed)
    assert order == ["p0", "p1a", "p1b", "p5", "p9a", "p9b"]


def test_claim_counts_inputs_up_to_max_items(store):
    store.submit([job("a", 3), job("b", 3), job("c", 3)])
    assert ids(store.claim(0, 7, "w1", 30)) == ["a", "b"]
    assert ids(store.claim(0, 7, "w1", 30)) == ["c"]
    assert store.claim(0, 7, "w1", 30) == []


def test_one_oversized_job_is_still_claimed_alone(store):
    store.submit([job("big", 10), job("small", 1)])
    assert ids(store.claim(0, 4, "w1", 30)) == ["big"]
    assert ids(store.claim(0, 4, "w1", 30)) == ["small"]


def test_claim_only_takes_its_stage(store):
    store.submit([job("a")])
    assert store.claim(1, 8, "w1", 30) == []
    assert ids(store.claim(0, 8, "w1", 30)) == ["a"]


def test_claims_from_two_handles_never_share_a_job(open_store):
    first, second = open_store(), open_store()
    first.submit([job(f"j{i:03d}") for i in range(120)])
    taken: dict[str, list[str]] = {"w1": [], "w2": []}

    def drain(store: Store, worker: str) -> None:
        while claimed := store.claim(0, 3, worker, 30):
            taken[worker].extend(ids(claimed))

    threads = [threading.Thread(target=drain, args=(s, w)) for s, w in ((first, "w1"), (second, "w2"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = taken["w1"] + taken["w2"]
    assert sorted(everything) == [f"j{i:03d}" for i in range(120)]  # each exactly once


# -- deadlines ---------------------------------------------------------------------------
def test_expired_deadline_fails_with_504_at_claim(store):
    store.submit([job("late", deadline=time.time() - 1), job("fine", deadline=time.time() + 60)])
    assert ids(store.claim(0, 8, "w1", 30)) == ["fine"]
    view = store.get(["late"])["late"]
    assert view.status is JobStatus.FAILED
    assert view.reason == TIMED_OUT_REASON and view.error_status == 504
    assert store.unfinished() == 1  # only "fine", which is processing


def test_expired_jobs_ahead_do_not_hide_a_live_one(store):
    past = time.time() - 1
    store.submit([job(f"late{i}", deadline=past, priority=0) for i in range(5)] + [job("live", priority=9)])
    assert ids(store.claim(0, 1, "w1", 30)) == ["live"]
    assert all(status(store, f"late{i}") is JobStatus.FAILED for i in range(5))


# -- finishing ---------------------------------------------------------------------------
def test_finish_done_stores_the_result(store):
    store.submit([job("a")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("a", 0, result=b'[{"x":1}]')], "w1")
    view = store.get(["a"])["a"]
    assert view.status is JobStatus.DONE and view.result == b'[{"x":1}]'
    assert store.unfinished() == 0 and store.queue_depths(1) == [0]


def test_finish_failed_keeps_reason_and_status(store):
    store.submit([job("a"), job("b")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("a", 0, reason="the predictor failed on input 0", error_status=500),
                  Outcome("b", 0, reason="client error", error_status=400)], "w1")
    a, b = store.get(["a", "b"]).values()
    assert a.status is JobStatus.FAILED and a.reason == "the predictor failed on input 0" and a.error_status == 500
    assert b.status is JobStatus.FAILED and b.error_status == 400


def test_finish_moves_a_chain_to_the_next_stage(store):
    store.submit([job("a", n_items=2, priority=3)])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("a", 0, payload=b"stage-1-input", n_items=2)], "w1")
    assert status(store, "a") is JobStatus.QUEUED
    assert store.queue_depths(2) == [0, 1] and store.unfinished() == 1
    assert store.claim(0, 8, "w1", 30) == []
    (claimed,) = store.claim(1, 8, "w2", 30)
    assert (claimed.id, claimed.stage, claimed.payload, claimed.n_items) == ("a", 1, b"stage-1-input", 2)
    store.finish([Outcome("a", 0, result=b"[0]")], "w1")  # a late stage-0 outcome: ignored
    assert status(store, "a") is JobStatus.PROCESSING
    store.finish([done("a", stage=1, value="final")], "w2")
    assert store.get(["a"])["a"].result == b'["final"]'
    assert store.unfinished() == 0 and store.queue_depths(2) == [0, 0]


def test_next_stage_keeps_priority_order(store):
    store.submit([job("low", priority=9), job("high", priority=1)])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("low", 0, payload=b"x", n_items=1), Outcome("high", 0, payload=b"y", n_items=1)], "w1")
    assert ids(store.claim(1, 1, "w2", 30)) == ["high"]


def test_finish_is_idempotent_first_outcome_wins(store):
    store.submit([job("a")])
    store.claim(0, 8, "w1", 30)
    store.finish([done("a", value="first")], "w1")
    store.finish([done("a", value="second")], "w1")
    store.finish([Outcome("a", 0, reason="late failure")], "w2")
    view = store.get(["a"])["a"]
    assert view.status is JobStatus.DONE and view.result == b'["first"]'


def test_job_predicted_twice_is_recorded_once(store):
    store.submit([job("a")])
    store.claim(0, 8, "w1", 30)
    store.maintain(time.time() + 60, FAR, FAR)  # w1's lease ran out: back in the queue
    assert status(store, "a") is JobStatus.QUEUED
    assert ids(store.claim(0, 8, "w2", 30)) == ["a"]
    store.finish([done("a", value="from w1")], "w1")  # the slow first worker finishes after all
    store.finish([done("a", value="from w2")], "w2")
    assert store.get(["a"])["a"].result == b'["from w1"]'
    assert store.unfinished() == 0 and store.queue_depths(1) == [0]
    store.heartbeat(info("w2"), 30)  # the second worker's heartbeat must not bring it back
    store.maintain(time.time() + 120, FAR, FAR)
    assert status(store, "a") is JobStatus.DONE and store.unfinished() == 0


def test_only_a_loop_no_other_holds_the_job_behind_may_delete_its_inputs(store):
    """Issue #25 point 1: w1's lease runs out mid-prediction and w2 claims the job again. w1 records
    first (its outcome counts) but must not delete the inputs w2 is reading; w2, recording after,
    may. Jobs no one else holds are free to the loop that records them, whatever became of them."""
    store.submit([job("a"), job("b"), job("c")])
    assert ids(store.claim(0, 8, "w1", 30)) == ["a", "b", "c"]
    store.maintain(time.time() + 60, FAR, FAR)  # w1's leases ran out: back in the queue
    assert ids(store.claim(0, 1, "w2", 30)) == ["a"]  # a is claimed again; b and c wait in the queue
    free = store.finish([done("a", value="from w1"), done("b"), done("c")], "w1")
    assert sorted(free) == ["b", "c"]  # a: w2 reads its inputs now
    assert store.get(["a"])["a"].result == b'["from w1"]'  # the first outcome still wins
    assert store.finish([done("a", value="from w2")], "w2") == ["a"]  # ignored, and nobody else holds it
    assert store.finish([done("gone")], "w2") == ["gone"]  # a job the store no longer has holds nothing
    store.submit([job("d")])
    store.claim(0, 8, "w3", 30)
    assert store.finish([Outcome("d", 0, payload=b"next", n_items=1)], "w3") == ["d"]  # moved on: stage 0 is free
    store.claim(1, 8, "w4", 30)
    assert store.finish([Outcome("d", 0, payload=b"again", n_items=1)], "w3") == ["d"]  # w4 holds stage 1, not 0


def test_upgrade_signs_an_earlier_versions_payloads_of_unfinished_jobs_for_their_jobs(store):
    """Issue #25 point 4 with a store secret: a chain's stage-1 payloads written before payloads named
    their job are signed for it at start-up; finished jobs and this version's payloads are left alone."""
    from fastdeploy.jobs import Binding, decode_payload, upgraded_payload
    from tests.old_redis_layout import legacy_stage_payload

    secret = "0123456789abcdef" * 4
    store.submit([job("a"), job("b")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("a", 0, payload=legacy_stage_payload([1], secret), n_items=1),
                  Outcome("b", 0, payload=legacy_stage_payload([2], secret), n_items=1)], "w1")
    store.claim(1, 1, "w2", 30)  # one of them is being predicted: it is signed again too
    resign = functools.partial(upgraded_payload, stage_secret=secret, job_secret="")
    assert store.upgrade(resign) == 2
    assert store.upgrade(resign) == 0
    store.release_worker("w2")
    claimed = store.claim(1, 8, "w3", 30)
    assert sorted(c.id for c in claimed) == ["a", "b"]
    for c in claimed:
        assert c.payload[:2] == b"S2"
        assert decode_payload(c.payload, secret, Binding(c.id, 1, c.owner, c.n_items))[0] in ([1], [2])


def test_outcome_for_a_requeued_job_still_counts(store):
    store.submit([job("a")])
    store.claim(0, 8, "w1", 30)
    store.maintain(time.time() + 60, FAR, FAR)
    store.finish([done("a")], "w1")
    assert status(store, "a") is JobStatus.DONE
    assert store.claim(0, 8, "w2", 30) == [] and store.unfinished() == 0


# -- workers, leases and maintenance ----------------------------------------------------------
def test_heartbeat_registers_workers(store):
    store.heartbeat(info("w1", stage=0, items=12, batch_buckets=[1, 2]), 30)
    store.heartbeat(info("w2", stage=1), 30)
    workers = {w.worker_id: w for w in store.workers()}
    assert set(workers) == {"w1", "w2"}
    w1 = workers["w1"]
    assert (w1.stage, w1.host, w1.pid, w1.batch_size, w1.ready) == (0, "host-a", 4242, 8, True)
    assert w1.stats == {"items": 12, "batch_buckets": [1, 2]}
    store.heartbeat(WorkerInfo("w1", 0, "host-a", 4242, 16, True, time.time(), {}), 30)
    assert {w.worker_id: w.batch_size for w in store.workers()}["w1"] == 16


def test_release_worker_requeues_its_jobs_in_their_place(store):
    store.submit([job("a", priority=2), job("b", priority=2), job("c", priority=5)])
    store.heartbeat(info("w1"), 30)
    assert ids(store.claim(0, 2, "w1", 30)) == ["a", "b"]
    assert store.queue_depths(1) == [1]
    assert store.release_worker("w1") == 2
    assert store.queue_depths(1) == [3] and store.unfinished() == 3
    assert "w1" not in {w.worker_id for w in store.workers()}
    assert ids(store.claim(0, 3, "w2", 30)) == ["a", "b", "c"]
    assert store.release_worker("nobody") == 0


def test_poison_job_fails_after_max_attempts(store):
    store.submit([job("poison")])
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert ids(store.claim(0, 8, f"w{attempt}", 30)) == ["poison"]
        assert store.release_worker(f"w{attempt}") == 1
        if attempt < MAX_ATTEMPTS:
            assert status(store, "poison") is JobStatus.QUEUED
    view = store.get(["poison"])["poison"]
    assert view.status is JobStatus.FAILED and view.error_status == 500
    assert f"stopped {MAX_ATTEMPTS} times" in view.reason
    assert store.claim(0, 8, "w9", 30) == [] and store.unfinished() == 0


def test_maintain_requeues_lapsed_leases(store):
    store.submit([job("a"), job("b")])
    store.claim(0, 1, "w1", 30)
    store.maintain(time.time(), FAR, FAR)  # lease still valid: nothing happens
    assert status(store, "a") is JobStatus.PROCESSING
    store.maintain(time.time() + 31, FAR, FAR)
    assert status(store, "a") is JobStatus.QUEUED
    assert store.queue_depths(1) == [2] and store.unfinished() == 2
    assert ids(store.claim(0, 1, "w2", 30)) == ["a"]


def test_heartbeat_extends_leases(store):
    store.submit([job("a")])
    store.claim(0, 8, "w1", 1)
    store.heartbeat(info("w1"), 100)
    store.maintain(time.time() + 10, FAR, FAR)
    assert status(store, "a") is JobStatus.PROCESSING


def test_maintain_requeues_jobs_of_silent_workers(store):
    now = time.time()
    store.submit([job("a")])
    store.heartbeat(info("w1", seen=now), 1000)
    store.claim(0, 8, "w1", 1000)
    store.heartbeat(info("w1", seen=now), 1000)
    store.heartbeat(info("w2", seen=now + 20), 1000)
    store.maintain(now + 10, FAR, 30)  # heard from 10 s ago: alive
    assert status(store, "a") is JobStatus.PROCESSING
    store.maintain(now + 40, FAR, 30)  # lease still runs, but w1 has been silent 40 s
    assert status(store, "a") is JobStatus.QUEUED
    assert {w.worker_id for w in store.workers()} == {"w2"}
    assert ids(store.claim(0, 8, "w2", 30)) == ["a"]


def test_results_expire_after_the_ttl(store):
    store.submit([job("a", webhook="http://127.0.0.1:9/hook"), job("b")])
    store.claim(0, 8, "w1", 30)
    store.finish([done("a"), Outcome("b", 0, reason="bad")], "w1")
    now = time.time()
    store.maintain(now, 3600, FAR)
    assert set(store.get(["a", "b"])) == {"a", "b"}
    store.maintain(now + 100, 10, FAR)
    assert store.get(["a", "b"]) == {}
    assert store.unfinished() == 0


def test_a_prediction_its_caller_waited_for_expires_after_its_own_shorter_ttl(store):
    """A /sync job (it has an origin) that succeeded is kept ``waited_ttl``: its caller has the answer.
    Its failures stay ``result_ttl`` (the status page lists them), as /async jobs do. Redis expires a
    job by its key's own TTL, on its own clock: the TTLs are published first and the test waits them out."""
    store.maintain(time.time(), 3600, FAR, waited_ttl=0.05)
    store.submit([job("sync-done", origin="api-1"), job("sync-failed", origin="api-1"), job("async-done")])
    store.claim(0, 8, "w1", 30)
    store.finish([done("sync-done"), Outcome("sync-failed", 0, reason="bad"), done("async-done")], "w1")
    assert set(store.get(["sync-done", "sync-failed", "async-done"])) == {"sync-done", "sync-failed", "async-done"}
    time.sleep(0.2)
    store.maintain(time.time(), 3600, FAR, waited_ttl=0.05)
    assert set(store.get(["sync-done", "sync-failed", "async-done"])) == {"sync-failed", "async-done"}
    assert [f.unique_id for f in store.recent_failures(10)] == ["sync-failed"]
    store.submit([job("sync-done", origin="api-1")])  # its id is free again
    store.maintain(time.time(), 0.05, FAR, waited_ttl=7200)  # never kept longer than any other result
    store.claim(0, 8, "w1", 30)
    store.finish([done("sync-done")], "w1")
    time.sleep(0.2)
    store.maintain(time.time(), 0.05, FAR, waited_ttl=7200)
    assert store.get(["sync-done"]) == {}


def test_unfinished_and_queue_depths(store):
    assert store.unfinished() == 0 and store.queue_depths(3) == [0, 0, 0]
    store.submit([job("a"), job("b"), job("c")])
    assert store.unfinished() == 3 and store.queue_depths(2) == [3, 0]
    store.claim(0, 1, "w1", 30)
    assert store.unfinished() == 3 and store.queue_depths(2) == [2, 0]
    store.finish([Outcome("a", 0, payload=b"x", n_items=1)], "w1")
    assert store.unfinished() == 3 and store.queue_depths(2) == [2, 1]
    store.claim(1, 8, "w2", 30)
    store.finish([done("a", stage=1)], "w2")
    assert store.unfinished() == 2 and store.queue_depths(2) == [2, 0]


# -- webhook outbox -------------------------------------------------------------------------
def _wait_for_webhook(store: Store, lease: float, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = store.claim_webhooks(10, lease)
        if deliveries:
            return deliveries
        time.sleep(0.05)
    raise AssertionError("the webhook never became due again")


def test_webhook_outbox_claim_lease_retry_delivered(store):
    store.submit([job("a", webhook="http://127.0.0.1:1/hook"), job("b")])
    assert store.claim_webhooks(10, 30) == []  # nothing finished yet
    store.claim(0, 8, "w1", 30)
    store.finish([done("a", value=7), done("b")], "w1")
    (delivery,) = store.claim_webhooks(10, 0.3)
    assert (delivery.job_id, delivery.url, delivery.attempts) == ("a", "http://127.0.0.1:1/hook", 0)
    assert orjson.loads(delivery.body) == {"unique_id": "a", "status": "done", "success": True, "prediction": [7]}
    assert store.claim_webhooks(10, 30) == []  # leased to the first sender
    (again,) = _wait_for_webhook(store, 30)  # the lease ran out: due again
    assert again.job_id == "a" and again.attempts == 0
    assert store.get(["a"])["a"].webhook == WebhookState("pending", 0, None)
    assert store.get(["b"])["b"].webhook is None  # no webhook, no state
    before = time.time()
    store.webhook_retry("a", time.time() + 100)
    assert store.claim_webhooks(10, 30) == []  # not due yet
    first = store.get(["a"])["a"].webhook
    assert first is not None and (first.status, first.attempts) == ("pending", 1)
    assert first.last_attempt_at is not None and before <= first.last_attempt_at <= time.time()
    store.webhook_retry("a", time.time() - 1)
    (retried,) = store.claim_webhooks(10, 30)
    assert retried.attempts == 2
    store.webhook_delivered("a")
    delivered = store.get(["a"])["a"].webhook
    assert delivered is not None and (delivered.status, delivered.attempts) == ("delivered", 3)
    assert delivered.last_attempt_at is not None and first.last_attempt_at <= delivered.last_attempt_at <= time.time()
    store.webhook_retry("a", time.time() - 1)  # a late retry after delivery resurrects nothing
    assert store.claim_webhooks(10, 0.01) == []
    time.sleep(0.05)
    assert store.claim_webhooks(10, 30) == []
    assert store.get(["a"])["a"].webhook == delivered


def test_a_webhook_given_up_shows_failed_and_when(store):
    store.submit([job("a", webhook="http://127.0.0.1:1/hook")])
    store.claim(0, 8, "w1", 30)
    store.finish([done("a")], "w1")
    (delivery,) = store.claim_webhooks(10, 30)
    before = time.time()
    store.webhook_failed("a")
    state = store.get(["a"])["a"].webhook
    assert state is not None and (state.status, state.attempts) == ("failed", 1)
    assert state.last_attempt_at is not None and before <= state.last_attempt_at <= time.time()
    time.sleep(0.05)
    assert store.claim_webhooks(10, 30) == []


def test_webhook_for_failed_and_timed_out_jobs(store):
    store.submit([job("late", deadline=time.time() - 1, webhook="http://h/late"), job("bad", webhook="http://h/bad")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("bad", 0, reason="it broke")], "w1")
    bodies = {d.job_id: orjson.loads(d.body) for d in store.claim_webhooks(10, 30)}
    assert bodies["late"] == {"unique_id": "late", "status": "failed", "success": False, "reason": TIMED_OUT_REASON}
    assert bodies["bad"] == {"unique_id": "bad", "status": "failed", "success": False, "reason": "it broke"}


def test_webhook_is_leased_to_one_sender_at_a_time(open_store):
    first, second = open_store(), open_store()
    first.submit([job(f"j{i}", webhook="http://h/x") for i in range(20)])
    first.claim(0, 100, "w1", 30)
    first.finish([done(f"j{i}") for i in range(20)], "w1")
    got: list[list[str]] = [[], []]

    def take(store: Store, slot: int) -> None:
        for _ in range(10):
            got[slot] += [d.job_id for d in store.claim_webhooks(3, 30)]

    threads = [threading.Thread(target=take, args=(s, i)) for i, s in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got[0] + got[1]) == sorted(f"j{i}" for i in range(20))


# -- doorbells ------------------------------------------------------------------------------
def test_wait_for_results_hears_of_the_jobs_this_api_server_waits_for(open_store, open_doorbell):
    api, loop, bell = open_store(), open_store(), open_doorbell()
    bell.listen_for_results()
    soon, here = time.time() + 60, bell.address
    api.submit([job("a", deadline=soon, origin=here), job("b", deadline=soon, origin=here),
                job("late", deadline=time.time() - 1, origin=here)])
    loop.claim(0, 8, "w1", 30)
    loop.finish([done("a"), Outcome("b", 0, reason="bad", error_status=422)], "w1")
    news: list = []
    deadline = time.monotonic() + 10
    while not {"a", "b", "late"} <= news_ids(news) and time.monotonic() < deadline:
        news.extend(bell.wait_for_results(1.0))
    assert {"a", "b", "late"} <= news_ids(news)
    for item in news:  # an outcome that comes with the news is the stored one
        if isinstance(item, JobView):
            assert item == api.get([item.id])[item.id]


def test_outcomes_reach_only_the_api_server_that_waits_for_them(open_store, open_doorbell):
    api, loop = open_store(), open_store()
    waiting, other = open_doorbell(), open_doorbell()
    waiting.listen_for_results()
    other.listen_for_results()
    soon, here = time.time() + 60, waiting.address
    assert here and here != other.address
    api.submit([job("ok", deadline=soon, origin=here), job("bad", deadline=soon, origin=here), job("async")])
    loop.claim(0, 8, "w1", 30)
    loop.finish([done("ok", value="fine"), Outcome("bad", 0, reason="no good", error_status=422), done("async")], "w1")
    heard: list = []
    deadline = time.monotonic() + 5
    while not {"ok", "bad"} <= news_ids(heard) and time.monotonic() < deadline:
        heard.extend(waiting.wait_for_results(0.2))
    carried = sorted((item for item in heard if isinstance(item, JobView)), key=lambda view: view.id)
    assert carried == [JobView("bad", JobStatus.FAILED, None, "no good", 422),
                       JobView("ok", JobStatus.DONE, b'["fine"]', None, 500)]  # whole: no read needed
    assert not any(isinstance(item, JobView) for item in other.wait_for_results(0.5))


def test_wait_for_results_returns_after_timeout_without_news(open_doorbell):
    bell = open_doorbell()
    bell.listen_for_results()
    started = time.monotonic()
    assert bell.wait_for_results(0.2) == []
    assert 0.1 <= time.monotonic() - started < 3


def test_wait_for_jobs_wakes_on_submit(store, open_doorbell):
    bell = open_doorbell()
    bell.listen_for_jobs(0)
    bell.wait_for_jobs(0, 0.01)  # nothing queued: returns at once
    waited: list[float] = []

    def wait() -> None:
        started = time.monotonic()
        bell.wait_for_jobs(0, 5.0)
        waited.append(time.monotonic() - started)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)  # let the loop block first: the point is that the submit wakes it
    store.submit([job("a")])
    thread.join(10)
    assert waited and waited[0] < 2.5, waited


def test_wait_for_jobs_returns_after_timeout_without_news(open_doorbell):
    bell = open_doorbell()
    bell.listen_for_jobs(0)
    started = time.monotonic()
    bell.wait_for_jobs(0, 0.2)
    assert 0.1 <= time.monotonic() - started < 3


def test_a_non_blocking_submit_writes_or_says_it_did_not(store):
    written = store.submit([job("a")], block=False)
    assert (status(store, "a") is JobStatus.QUEUED) == written
    assert store.submit([job("b")]) is True and status(store, "b") is JobStatus.QUEUED


def test_cancel_fails_only_queued_jobs(store):
    store.submit([job("a"), job("b"), job("c")])
    (claimed,) = store.claim(0, 1, "w1", 30.0)
    assert claimed.id == "a"
    store.finish([done("a")], "w1")
    store.claim(0, 1, "w1", 30.0)  # b is being predicted now
    assert store.cancel(["a", "b", "c", "unknown"], "the client went away", 499) == ["c"]
    views = store.get(["a", "b", "c"])
    assert views["a"].status is JobStatus.DONE and views["b"].status is JobStatus.PROCESSING
    assert views["c"].status is JobStatus.FAILED and views["c"].reason == "the client went away"
    assert views["c"].error_status == 499
    assert store.claim(0, 10, "w2", 30.0) == []
    assert store.unfinished() == 1


# -- fair share: lanes (owners) take turns ----------------------------------------------------
def owned(job_id: str, owner: str, priority: int = 9, n_items: int = 1) -> NewJob:
    return NewJob(job_id, b"payload-" + job_id.encode(), n_items, priority, None, None, None, owner)


def test_a_crowded_lane_does_not_hold_back_another_owners_next_job(store):
    store.submit([owned(f"a{i}", "key-a", priority=0) for i in range(200)])
    store.submit([owned("b0", "key-b", priority=9)])  # a later, lower priority job of another owner
    assert "b0" in ids(store.claim(0, 8, "w1", 30))  # within one batch, not after 200 jobs


def test_lanes_take_turns_job_by_job_and_claim_after_claim(store):
    store.submit([owned(f"{o}{i}", f"key-{o}") for o in "abc" for i in range(4)])
    assert sorted(ids(store.claim(0, 3, "w1", 30))) == ["a0", "b0", "c0"]
    assert sorted(ids(store.claim(0, 3, "w1", 30))) == ["a1", "b1", "c1"]
    # one job per claim: the turn moves on from the lane the last claim ended with
    singles = [ids(store.claim(0, 1, "w1", 30))[0][0] for _ in range(6)]
    assert sorted(singles) == ["a", "a", "b", "b", "c", "c"]
    assert all(x != y for x, y in zip(singles, singles[1:])), singles  # never the same lane twice in a row


def test_within_a_lane_the_owners_priorities_keep_their_order(store):
    store.submit([owned("late-urgent", "key-a", priority=0)])
    store.submit([owned("early", "key-a", priority=9), owned("mid", "key-a", priority=5)])
    store.submit([owned("b-first", "key-b", priority=9)])
    order = [ids(store.claim(0, 1, "w1", 30))[0] for _ in range(4)]
    assert [i for i in order if i != "b-first"] == ["late-urgent", "mid", "early"]


def test_unfinished_jobs_are_counted_per_owner_queued_or_processing(store):
    """The per-key queue bound (--queue-limit-per-key) reads these counts."""
    store.submit([owned("a1", "key-a"), owned("a2", "key-a"), owned("a3", "key-a"), owned("b1", "key-b")])
    assert store.unfinished_by_owner() == {"key-a": 3, "key-b": 1}
    claimed = ids(store.claim(0, 2, "w1", 30))  # processing still counts
    assert store.unfinished_by_owner() == {"key-a": 3, "key-b": 1}
    assert "a3" not in claimed  # the last of its lane
    store.finish([done(i) for i in claimed], "w1")  # finished and cancelled jobs no longer count
    store.cancel(["a3"], "cancelled by its client", 409, status=JobStatus.CANCELLED)
    left = {"a1", "a2", "b1"} - set(claimed)
    expected = {f"key-{i[0]}": sum(1 for j in left if j[0] == i[0]) for i in left}
    assert {o: n for o, n in store.unfinished_by_owner().items() if n} == expected


def test_an_owners_job_is_read_back_with_its_owner(store):
    store.submit([owned("x", "key-x")])
    assert store.get(["x"])["x"].owner == "key-x"


def test_requeued_and_next_stage_jobs_stay_in_their_owners_lane(store):
    store.submit([owned("a", "key-a"), owned("b", "key-b")])
    store.claim(0, 8, "w1", 30)
    store.release_worker("w1")  # both back in the queue, each in its lane
    assert sorted(ids(store.claim(0, 8, "w2", 30))) == ["a", "b"]
    store.finish([Outcome("a", 0, payload=b"next", n_items=1)], "w2")
    (moved,) = store.claim(1, 8, "w3", 30)
    assert moved.id == "a" and store.queue_depths(2) == [0, 0] and store.unfinished() == 2


# -- client-chosen ids: an id the store holds is JobExists, never a store failure -------
def test_an_id_in_use_is_refused_and_nothing_of_the_batch_is_written(store):
    from fastdeploy.errors import JobExists, StoreUnavailable

    store.submit([job("client:42")])
    with pytest.raises(JobExists) as refused:
        store.submit([job("fresh-1"), job("client:42"), job("fresh-2")])
    assert refused.value.ids == ("client:42",) and refused.value.status == 409
    assert not isinstance(refused.value, StoreUnavailable)
    assert set(store.get(["fresh-1", "client:42", "fresh-2"])) == {"client:42"}  # all or nothing
    store.submit([job("fresh-1"), job("fresh-2")])  # the rest go through on their own
    assert store.unfinished() == 3


def test_an_id_twice_in_one_batch_is_refused(store):
    from fastdeploy.errors import JobExists

    with pytest.raises(JobExists) as refused:
        store.submit([job("twice"), job("other"), job("twice")])
    assert refused.value.ids == ("twice",)
    assert store.get(["twice", "other"]) == {}


def test_an_id_stays_in_use_until_its_result_expires(store):
    from fastdeploy.errors import JobExists

    store.submit([job("kept")])
    store.claim(0, 8, "w1", 30)
    store.finish([done("kept")], "w1")
    with pytest.raises(JobExists):
        store.submit([job("kept")])  # finished, result still readable: still in use
    store.maintain(time.time() + 10, result_ttl=1, worker_timeout=FAR)
    assert store.get(["kept"]) == {}
    store.submit([job("kept")])  # expired: free again
    assert store.get(["kept"])["kept"].status is JobStatus.QUEUED


def test_a_non_blocking_submit_reports_an_id_in_use_too(store):
    from fastdeploy.errors import JobExists

    store.submit([job("nb")])
    try:
        written = store.submit([job("nb")], block=False)
    except JobExists as exc:
        assert exc.ids == ("nb",)
    else:
        assert written is False  # a store that never writes from the event loop says so


def test_recent_failures_newest_first_and_only_failures(store):
    """What the status page lists as the last failures: failed and timed-out jobs, not done or cancelled ones."""
    store.submit([job("late", deadline=time.time() - 1), job("bad"), job("fine"), job("gone")])
    store.cancel(["gone"], "cancelled by its client", 409, status=JobStatus.CANCELLED)
    store.claim(0, 8, "w1", 30)
    time.sleep(0.01)  # "bad" finishes after "late" timed out at the claim
    store.finish([Outcome("bad", 0, reason="it broke"), done("fine")], "w1")
    failures = store.recent_failures(10)
    assert [(f.unique_id, f.reason) for f in failures] == [("bad", "it broke"), ("late", TIMED_OUT_REASON)]
    assert failures[0].at >= failures[1].at > time.time() - 60
    assert [f.unique_id for f in store.recent_failures(1)] == ["bad"]


def test_recent_failures_carry_their_owner(store):
    """So the status page can show each API key the failures of its own jobs only."""
    store.submit([owned("a", "key-a"), owned("b", "key-b")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("a", 0, reason="a broke"), Outcome("b", 0, reason="b broke")], "w1")
    assert sorted((f.unique_id, f.owner) for f in store.recent_failures(10)) == [("a", "key-a"), ("b", "key-b")]


def test_a_failure_is_never_shown_as_another_owners_job_of_the_same_id(store):
    """An id may be used again once its job's result is gone (ids can be the client's own):
    the old failure must not be listed under the new job's owner."""
    store.submit([owned("x", "key-a")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("x", 0, reason="a's job broke")], "w1")
    store.maintain(time.time() + 7200, 3600, 60)  # its result expires ...
    store.submit([owned("x", "key-b")])  # ... and another key uses the id
    listed = [f for f in store.recent_failures(10) if f.unique_id == "x"]  # SQLite forgot it with its job;
    assert all(f.owner != "key-b" for f in listed)  # Redis keeps the entry, but not under key-b


def test_the_outbox_counts_pending_delivered_and_given_up_webhooks_once(store):
    store.submit([job(name, webhook="http://127.0.0.1:1/hook") for name in ("a", "b", "c")])
    store.claim(0, 8, "w1", 30)
    assert store.outbox() == Outbox(0, 0, 0)
    store.finish([done("a"), done("b"), done("c")], "w1")
    assert store.outbox() == Outbox(3, 0, 0)
    store.webhook_delivered("a")
    store.webhook_failed("b")
    store.webhook_delivered("a")  # told twice (two senders): counted once
    store.webhook_failed("a")  # a delivered webhook is not given up afterwards
    assert store.outbox() == Outbox(1, 1, 1)
    state = store.get(["a"])["a"].webhook
    assert state is not None and (state.status, state.attempts) == ("delivered", 1)


# -- the per-key bound, in the write itself (issue 19 point 3) ------------------------------
def unfinished_of(store: Store, owner: str, limit: int = 8) -> int:
    """The owner's unfinished jobs as the bound sees them (one more than ``limit`` probes, all refused,
    nothing written), checked against ``unfinished_by_owner``."""
    from fastdeploy.errors import OwnerLimitReached

    probes = [owned(f"probe-{i}", owner) for i in range(limit + 1)]
    with pytest.raises(OwnerLimitReached) as refused:
        store.submit(probes, owner_limit=limit)
    counted = limit - (len(probes) - len(refused.value.ids))
    assert counted == store.unfinished_by_owner().get(owner, 0)
    return counted


def test_submit_refuses_the_jobs_past_their_owners_bound_and_writes_nothing(store):
    from fastdeploy.errors import OwnerLimitReached, TooManyRequests

    store.submit([owned("a1", "key-a"), owned("a2", "key-a")], owner_limit=3)
    store.claim(0, 1, "w1", 30)  # processing counts as much as queued
    with pytest.raises(OwnerLimitReached) as refused:
        store.submit([owned("a3", "key-a"), owned("b1", "key-b"), owned("a4", "key-a"), owned("a5", "key-a")],
                     owner_limit=3)
    assert refused.value.ids == ("a4", "a5") and isinstance(refused.value, TooManyRequests)
    assert "QUEUE_LIMIT_PER_KEY=3" in refused.value.reason
    assert store.get(["a3", "a4", "a5", "b1"]) == {}  # all or nothing, as for ids in use
    store.submit([owned("a3", "key-a"), owned("b1", "key-b")], owner_limit=3)  # the rest go through
    assert store.unfinished_by_owner() == {"key-a": 3, "key-b": 1}
    with pytest.raises(OwnerLimitReached):
        store.submit([owned("a4", "key-a")], owner_limit=3)
    store.submit([owned("a4", "key-a")])  # no bound asked for: none applied


def test_an_id_in_use_is_named_before_the_bound(store):
    from fastdeploy.errors import JobExists

    store.submit([owned("a1", "key-a")], owner_limit=1)
    with pytest.raises(JobExists):
        store.submit([owned("a1", "key-a"), owned("a2", "key-a")], owner_limit=1)


def test_the_bound_frees_a_place_once_for_each_way_a_job_ends(store):
    """Done, failed, cancelled (queued or running), timed out, given up after killing loops: each frees one
    place, once, however often its end is reported; moving to the next stage or back to the queue frees none."""
    from fastdeploy.errors import OwnerLimitReached

    late = NewJob("late", b"p", 1, 0, time.time() - 1, None, None, "k")  # first in its lane, timed out
    names = ["done", "failed", "next", "poison-1", "poison-2", "cancel-run", "cancel-q"]
    store.submit([late] + [owned(n, "k") for n in names], owner_limit=8)
    assert unfinished_of(store, "k") == 8
    claimed = ids(store.claim(0, 6, "w1", 30))  # "late" times out at the claim
    assert claimed == names[:6] and unfinished_of(store, "k") == 7
    store.finish([done("done"), Outcome("failed", 0, reason="broke"), Outcome("next", 0, payload=b"n", n_items=1)],
                 "w1")
    store.finish([done("done"), Outcome("failed", 0, reason="again")], "w1")  # told twice: counted once
    store.cancel(["done", "cancel-q", "cancel-run"], "cancelled", 409, status=JobStatus.CANCELLED, running=True)
    assert unfinished_of(store, "k") == 3  # next (at stage 1), poison-1, poison-2
    store.submit([owned(f"x{i}", "k") for i in range(5)], owner_limit=8)
    with pytest.raises(OwnerLimitReached):
        store.submit([owned("x5", "k")], owner_limit=8)
    store.cancel([f"x{i}" for i in range(5)], "cancelled", 409, status=JobStatus.CANCELLED)
    store.release_worker("w1")  # back in the queue: still unfinished
    assert unfinished_of(store, "k") == 3
    for attempt in range(1, MAX_ATTEMPTS):  # each claim of theirs kills its loop
        assert sorted(ids(store.claim(0, 8, f"w{attempt + 1}", 30))) == ["poison-1", "poison-2"]
        store.release_worker(f"w{attempt + 1}")
    assert status(store, "poison-1") is JobStatus.FAILED and unfinished_of(store, "k") == 1
    store.submit([owned(f"y{i}", "k") for i in range(7)], owner_limit=8)
    assert unfinished_of(store, "k") == 8


def test_the_bound_holds_between_handles_writing_at_once(open_store):
    """Two handles act as two API servers: between them, never more than the bound."""
    from fastdeploy.errors import OwnerLimitReached

    handles = [open_store(), open_store()]
    accepted: list[str] = []
    start = threading.Barrier(2)

    def write(handle: Store, side: str) -> None:
        start.wait()
        for i in range(15):
            try:
                handle.submit([owned(f"{side}{i}", "key-a")], owner_limit=10)
                accepted.append(f"{side}{i}")
            except OwnerLimitReached:
                pass

    threads = [threading.Thread(target=write, args=(h, side)) for h, side in zip(handles, "pq")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 10 and handles[0].unfinished_by_owner() == {"key-a": 10}


# -- failures per owner (issue 19 point 4) ----------------------------------------------------
def test_an_owners_failures_are_kept_however_many_another_owner_makes(store):
    store.submit([owned("a-bad", "key-a")])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome("a-bad", 0, reason="a broke")], "w1")
    for start in range(0, 60, 20):
        store.submit([owned(f"b{i}", "key-b") for i in range(start, start + 20)])
        store.finish([Outcome(c.id, 0, reason="b broke") for c in store.claim(0, 100, "w1", 30)], "w1")
    (mine,) = store.recent_failures(10, "key-a")
    assert (mine.unique_id, mine.reason, mine.owner) == ("a-bad", "a broke", "key-a")
    theirs = store.recent_failures(10, "key-b")
    assert len(theirs) == 10 and {f.owner for f in theirs} == {"key-b"}
    assert theirs[0].at >= theirs[-1].at
    assert store.recent_failures(10, "key-c") == []
    assert all(f.unique_id != "a-bad" for f in store.recent_failures(50))  # of everyone: the newest


def test_get_for_an_owner_leaves_out_other_owners_jobs(store):
    store.submit([NewJob("mine", b"p", 1, 9, owner="key:a"), NewJob("theirs", b"p", 1, 9, owner="key:b"),
                  NewJob("anon", b"p", 1, 9)])
    store.claim(0, 8, "w1", 30)
    store.finish([Outcome(i, 0, result=b'["r"]') for i in ("mine", "theirs", "anon")], "w1")
    views = store.get(["mine", "theirs", "anon", "unknown"], "key:a")
    assert set(views) == {"mine"} and views["mine"].result == b'["r"]' and views["mine"].owner == "key:a"
    assert set(store.get(["mine", "anon"], "")) == {"anon"}
    assert set(store.get(["mine", "theirs", "anon"])) == {"mine", "theirs", "anon"}
