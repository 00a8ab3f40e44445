"""What only the embedded SQLite store does: large inputs in a table of their own, outcomes
too large for one datagram, checkpoints and schema upgrades."""

from __future__ import annotations

import sqlite3
import time

from fastdeploy.jobs import JobStatus, JobView, NewJob, Outcome
from fastdeploy.store.bells import MAX_DATAGRAM
from fastdeploy.store.sqlite import SQLiteStore


def _payload_ids(tmp_path) -> list[str]:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        return sorted(row[0] for row in db.execute("SELECT id FROM payloads"))
    finally:
        db.close()


def test_small_inputs_stay_in_the_row_and_large_ones_round_trip_through_their_table(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        large = bytes(range(256)) * 400  # 100 KB, like a FILE request
        store.submit([NewJob("small", b"tiny", 1, 9, None, None), NewJob("large", large, 1, 9, None, None)])
        assert _payload_ids(tmp_path) == ["large"]
        claimed = {c.id: c.payload for c in store.claim(0, 8, "w1", 30)}
        assert claimed == {"small": b"tiny", "large": large}
    finally:
        store.close()


def test_large_inputs_are_dropped_once_their_job_ends_and_kept_while_it_lives(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store.submit([NewJob(f"j{i}", b"x" * 100_000, 1, 9, None, None) for i in range(4)])
        store.claim(0, 3, "w1", 30)  # j0, j1, j2 leased; j3 still queued
        store.finish([Outcome("j0", 0, result=b"[1]"), Outcome("j1", 0, reason="bad input")], "w1")
        store.cancel(["j3"], "client gone", 499)
        assert _payload_ids(tmp_path) == ["j2"]  # j2 is still being predicted
        store.release_worker("w1")  # the loop died: j2 goes back to the queue with its inputs
        (again,) = store.claim(0, 8, "w2", 30)
        assert (again.id, again.payload) == ("j2", b"x" * 100_000)
    finally:
        store.close()


def test_a_chain_moves_a_large_stage_output_to_the_next_stage(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store.submit([NewJob("c", b"in", 1, 9, None, None)])
        store.claim(0, 8, "w1", 30)
        store.finish([Outcome("c", 0, payload=b"y" * 5000, n_items=1)], "w1")
        (next_stage,) = store.claim(1, 8, "w2", 30)
        assert next_stage.payload == b"y" * 5000
        store.finish([Outcome("c", 1, payload=b"z", n_items=1)], "w2")
        assert _payload_ids(tmp_path) == []  # the small output went back into the row
        (last,) = store.claim(2, 8, "w3", 30)
        assert last.payload == b"z"
    finally:
        store.close()


# -- peek: a lone client's job read without a lease ----------------------------------
def test_peek_reads_the_head_of_the_queue_without_leasing_it(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        assert store.peek(0) is None
        store.submit([NewJob("a", b"1", 1, 9, None, None), NewJob("b", b"2", 1, 9, None, None)])
        peeked = store.peek(0)
        assert peeked is not None and (peeked.id, peeked.payload, peeked.n_items) == ("a", b"1", 1)
        assert store.get(["a"])["a"].status is JobStatus.QUEUED
        assert [j.id for j in store.claim(0, 8, "w1", 30)] == ["a", "b"]  # nothing was held back
    finally:
        store.close()


def test_a_peeked_job_is_finished_once_and_a_dying_loop_leaves_it_queued(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store.submit([NewJob("a", b"1", 1, 9, None, None), NewJob("b", b"2", 1, 9, None, None)])
        assert store.peek(0).id == "a"
        store.release_worker("w1")  # the loop died mid-prediction: nothing to requeue, "a" never left
        assert store.peek(0).id == "a"
        store.finish([Outcome("a", 0, result=b"[1]")], "w1")
        store.finish([Outcome("a", 0, result=b"[2]")], "w2")  # a late duplicate changes nothing
        view = store.get(["a"])["a"]
        assert (view.status, view.result) == (JobStatus.DONE, b"[1]")
        assert store.peek(0).id == "b"
    finally:
        store.close()


def test_peek_leaves_cancelled_timed_out_and_large_jobs_to_the_claim(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store.submit([NewJob("gone", b"1", 1, 9, time.time() + 60, None)])
        store.cancel(["gone"], "client gone", 499)
        store.finish([Outcome("gone", 0, result=b"[1]")], "w1")  # predicted after all: not delivered
        assert store.get(["gone"])["gone"].status is JobStatus.FAILED
        assert store.peek(0) is None
        store.submit([NewJob("late", b"1", 1, 9, time.time() - 1, None)])
        assert store.peek(0) is None  # the claim fails it as timed out
        assert store.claim(0, 8, "w1", 30) == [] and store.get(["late"])["late"].status is JobStatus.FAILED
        store.submit([NewJob("big", b"x" * 100_000, 1, 9, None, None)])
        assert store.peek(0) is None  # its input lives in the payloads table
        assert [j.id for j in store.claim(0, 8, "w1", 30)] == ["big"]
    finally:
        store.close()


# -- result rings: outcomes go straight to the API server that waits -------------------
def _news(store: SQLiteStore, want: int) -> list:
    news: list = []
    deadline = time.monotonic() + 5
    while len(news) < want and time.monotonic() < deadline:
        news.extend(store.wait_for_results(0.2))
    return news


def test_an_outcome_too_large_for_one_ring_arrives_as_its_id(tmp_path):
    api, loop = SQLiteStore(tmp_path), SQLiteStore(tmp_path)
    try:
        api.listen_for_results()
        big = b'["' + b"y" * (MAX_DATAGRAM + 100) + b'"]'
        soon = time.time() + 60
        api.submit([NewJob(f"j{i}", b"x", 1, 9, soon, None, waited=True) for i in range(3)])
        loop.claim(0, 8, "w1", 30)
        loop.finish([Outcome("j0", 0, result=big), Outcome("j1", 0, result=b"[1]"),
                     Outcome("j2", 0, result=b'["' + b"z" * 40_000 + b'"]')], "w1")
        news = _news(api, 3)
        assert "j0" in news  # read from the store instead
        carried = {v.id: v.result for v in news if isinstance(v, JobView)}
        assert set(carried) == {"j1", "j2"} and carried["j2"] == api.get(["j2"])["j2"].result
    finally:
        api.close()
        loop.close()


def test_a_state_folder_from_before_result_rings_gets_the_new_column(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, stage INTEGER NOT NULL,"
               " status TEXT NOT NULL, priority INTEGER NOT NULL, payload BLOB, n_items INTEGER NOT NULL,"
               " deadline REAL, webhook TEXT, worker TEXT, lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0,"
               " result BLOB, reason TEXT, error_status INTEGER, created REAL NOT NULL, finished REAL)")
    db.execute("INSERT INTO jobs (id, stage, status, priority, payload, n_items, created)"
               " VALUES ('old', 0, 'queued', 9, X'01', 1, 0)")
    db.commit()
    db.close()
    store = SQLiteStore(tmp_path)
    try:
        assert [c.id for c in store.claim(0, 8, "w1", 30)] == ["old"]
        store.finish([Outcome("old", 0, result=b"[2]")], "w1")
        assert store.get(["old"])["old"].result == b"[2]"
    finally:
        store.close()


def test_request_connections_checkpoint_only_as_a_backstop_and_checkpoint_folds_the_log(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        (pages,) = store._db().execute("PRAGMA wal_autocheckpoint").fetchone()
        assert pages * 4096 >= 64 * 1024 * 1024  # not SQLite's default 1000 pages
        store.submit([NewJob(f"j{i}", b"x" * 200, 1, 9, None, None) for i in range(500)])
        size = (tmp_path / "jobs.sqlite3").stat().st_size
        store.checkpoint()
        assert (tmp_path / "jobs.sqlite3").stat().st_size > size
    finally:
        store.close()
