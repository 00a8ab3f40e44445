"""What only the embedded SQLite store does: large inputs in a table of their own, outcomes
too large for one datagram, checkpoints, schema upgrades, failed commits."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fastdeploy.errors import StoreUnavailable
from fastdeploy.jobs import JobStatus, JobView, NewJob, Outcome, WorkerInfo
from fastdeploy.store.local_doorbell import MAX_DATAGRAM, LocalDoorbell, bell_folder
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


# -- a failed COMMIT (disk full, constraint) must not leave the connection stuck ------------
def test_a_failed_commit_is_rolled_back_and_the_store_keeps_working(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        db = store._db()
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        db.execute("CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
        with pytest.raises(sqlite3.IntegrityError):  # fails at COMMIT, like a full disk does
            with store._write() as conn:
                conn.execute("INSERT INTO child VALUES (1)")
        assert not db.in_transaction
        store.submit([NewJob("a", b"1", 1, 9, None, None)])  # not "cannot start a transaction within a transaction"
        assert store.get(["a"])["a"].status is JobStatus.QUEUED
    finally:
        store.close()


def test_raw_sqlite_errors_surface_as_the_store_error(tmp_path):
    store = SQLiteStore(tmp_path)
    try:
        store._db().execute("DROP TABLE workers")  # any statement failing inside a public method
        with pytest.raises(StoreUnavailable, match="no such table"):
            store.workers()
        with pytest.raises(StoreUnavailable):
            store.heartbeat(WorkerInfo("w1", 0, "h", 1, 1, True, time.time(), {}), 30)
    finally:
        store.close()


# -- result rings: outcomes go straight to the API server that waits -------------------
def _news(bell: LocalDoorbell, want: int) -> list:
    news: list = []
    deadline = time.monotonic() + 5
    while len(news) < want and time.monotonic() < deadline:
        news.extend(bell.wait_for_results(0.2))
    return news


def test_an_outcome_too_large_for_one_ring_arrives_as_its_id(tmp_path):
    api, loop, bell = SQLiteStore(tmp_path), SQLiteStore(tmp_path), LocalDoorbell(bell_folder(tmp_path))
    try:
        bell.listen_for_results()
        big = b'["' + b"y" * (MAX_DATAGRAM + 100) + b'"]'
        soon = time.time() + 60
        api.submit([NewJob(f"j{i}", b"x", 1, 9, soon, None, bell.address) for i in range(3)])
        loop.claim(0, 8, "w1", 30)
        loop.finish([Outcome("j0", 0, result=big), Outcome("j1", 0, result=b"[1]"),
                     Outcome("j2", 0, result=b'["' + b"z" * 40_000 + b'"]')], "w1")
        news = _news(bell, 3)
        assert "j0" in news  # read from the store instead
        carried = {v.id: v.result for v in news if isinstance(v, JobView)}
        assert set(carried) == {"j1", "j2"} and carried["j2"] == api.get(["j2"])["j2"].result
    finally:
        api.close()
        loop.close()
        bell.close()


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


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def test_after_large_jobs_expire_checkpoints_give_the_space_back(tmp_path):
    """A 90 MB input once left a 285 MB WAL beside a 189 MB database for good: every connection cuts the
    WAL back when it starts it over, a checkpoint truncates a WAL a large job grew, and free pages go
    back to the disk a slice per checkpoint (new stores free pages incrementally)."""
    store = SQLiteStore(tmp_path)
    other = SQLiteStore(tmp_path)  # another process's connection: its own settings
    try:
        for db in (store._db(), other._db()):
            assert db.execute("PRAGMA journal_size_limit").fetchone()[0] == 16 * 2**20
        assert store._db().execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        for i in range(2):
            other.submit([NewJob(f"big{i}", os.urandom(30 * 2**20), 1, 9, None, None)])
            (claimed,) = other.claim(0, 8, "w", 30)
            other.finish([Outcome(claimed.id, 0, result=claimed.payload)], "w")
        assert _folder_mb(tmp_path) > 100
        other.maintain(time.time() + 10, 1, 60)  # the results expire
        for _ in range(40):
            store.checkpoint()
        assert _folder_mb(tmp_path) < 24, sorted((p.name, p.stat().st_size) for p in tmp_path.iterdir())
    finally:
        other.close()
        store.close()


def test_a_store_made_before_incremental_vacuum_keeps_its_free_pages_for_reuse(tmp_path):
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, stage INTEGER NOT NULL,"
               " status TEXT NOT NULL, priority INTEGER NOT NULL, payload BLOB, n_items INTEGER NOT NULL,"
               " deadline REAL, webhook TEXT, worker TEXT, lease_until REAL, attempts INTEGER NOT NULL DEFAULT 0,"
               " result BLOB, reason TEXT, error_status INTEGER, created REAL NOT NULL, finished REAL)")
    db.close()
    store = SQLiteStore(tmp_path)
    try:
        assert store._db().execute("PRAGMA auto_vacuum").fetchone()[0] == 0  # it cannot be turned on in place
        store.submit([NewJob("big", os.urandom(8 * 2**20), 1, 9, None, None)])
        store.cancel(["big"], "cancelled", 409)
        store.checkpoint()  # no error, no vacuum
        assert store._db().execute("PRAGMA freelist_count").fetchone()[0] > 1024
    finally:
        store.close()


def _open_after(folder: str, start: Any) -> None:
    start.wait()
    SQLiteStore(Path(folder)).close()


def test_processes_that_open_a_new_state_folder_together_all_get_the_store(tmp_path: Path) -> None:
    """An API server, a loop and a worker started at once all create the schema: SQLite refuses a
    journal-mode switch or a schema read that would deadlock at once, without waiting, and every
    one of them must still open the store (CI once saw `serve` exit with "database is locked")."""
    ctx = multiprocessing.get_context("fork")
    for round_ in range(12):
        folder = tmp_path / f"state{round_}"
        start = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_after, args=(str(folder), start)) for _ in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * 6, f"round {round_}: a process could not open the store"


def test_values_over_a_mebibyte_go_in_and_out_a_slice_at_a_time_unchanged(tmp_path: Path) -> None:
    """Inputs and results larger than the streaming threshold (written into a zeroblob, read into one
    buffer) come back byte for byte, at stage 0, across a stage change and as the final result."""
    store = SQLiteStore(tmp_path)
    try:
        first, second, result = (bytes([n]) * 3 + os.urandom(3 * 1024 * 1024 + 17) for n in range(3))
        store.submit([NewJob("big", first, 1, 9, None, None)])
        (claimed,) = store.claim(0, 8, "w", 30)
        assert bytes(claimed.payload) == first
        store.finish([Outcome("big", 0, payload=second, n_items=1)], "w")
        (claimed,) = store.claim(1, 8, "w", 30)
        assert bytes(claimed.payload) == second
        store.finish([Outcome("big", 1, result=result)], "w")
        view = store.get(["big"])["big"]
        assert view.status is JobStatus.DONE and bytes(view.result or b"") == result
        assert _payload_ids(tmp_path) == []  # the large input left with its job
    finally:
        store.close()


def test_a_results_row_left_behind_never_answers_for_a_new_job_of_that_id(tmp_path: Path) -> None:
    """A version that did not know the results table expired a job but left its large result there;
    a new job with the same id (a client's own id) gets its own result, small or large."""
    store = SQLiteStore(tmp_path)
    try:
        stale = b"[" + b"1" * (2 * 1024 * 1024) + b"]"

        def leave_stale_row() -> None:
            db = sqlite3.connect(tmp_path / "jobs.sqlite3")
            db.execute("INSERT INTO results (id, data) VALUES ('mine', ?)", (stale,))
            db.commit()
            db.close()

        leave_stale_row()
        store.submit([NewJob("mine", b"p", 1, 9, None, None)])
        store.claim(0, 8, "w", 30)
        store.finish([Outcome("mine", 0, result=b'["small"]')], "w")
        assert store.get(["mine"])["mine"].result == b'["small"]'
        store.maintain(time.time() + 10, 1, 1e9)  # expire it (and its results row, had it one)
        leave_stale_row()
        large = b"[" + b"2" * (2 * 1024 * 1024) + b"]"
        store.submit([NewJob("mine", b"p", 1, 9, None, None)])
        store.claim(0, 8, "w", 30)
        store.finish([Outcome("mine", 0, result=large)], "w")  # over the stale row: no IntegrityError
        assert bytes(store.get(["mine"])["mine"].result or b"") == large
    finally:
        store.close()


def _finish_many(store: SQLiteStore, count: int, origin: str | None, result: bytes = b'[{"text":"hello","id":1}]',
                 payload: bytes = b"\x82\xa1i\x91\x82\xa4text\xa5hello\xa2id\x01\xa1k\xc0") -> None:
    """``count`` small jobs (W1's payload and answer, a /sync one when ``origin`` is set) submitted, claimed and
    finished 64 at a time, as a loop under load would."""
    for start in range(0, count, 64):
        ids = [f"{origin or 'async'}-{i:07d}" for i in range(start, min(count, start + 64))]
        deadline = time.time() + 480 if origin is not None else None
        store.submit([NewJob(i, payload, 1, 8, deadline, None, origin, "addr:127.0.0.1") for i in ids])
        claimed = store.claim(0, len(ids), "w", 30)
        store.finish([Outcome(c.id, 0, result=result) for c in claimed], "w")


def _jobs_left(store: SQLiteStore) -> int:
    return int(store._db().execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def test_a_finished_small_job_costs_under_200_bytes_on_disk(tmp_path: Path) -> None:
    """What a row holds once its job ended (issue 25 point 8: 239 bytes per /sync job, 199 per /async one,
    before): no inputs, deadline, lease or bell name; one expiry index entry per job."""
    store = SQLiteStore(tmp_path)
    try:
        _finish_many(store, 5000, "api-123456-0.sock")
        _finish_many(store, 5000, None)
        db = store._db()
        row = db.execute("SELECT payload, deadline, lease_until, worker, origin, typeof(created) FROM jobs"
                         " WHERE id = 'api-123456-0.sock-0000000'").fetchone()
        assert row == (None, None, None, None, "", "real")
        try:
            pages = dict(db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
        per_job = sum(pages[name] for name in ("jobs", "sqlite_autoindex_jobs_1", "jobs_ended", "jobs_ended_waited"))
        assert per_job / 10_000 < 200, pages
    finally:
        store.close()


def test_expiry_goes_a_slice_at_a_time_and_catches_up_over_the_next_calls(tmp_path: Path) -> None:
    """One maintain() deletes at most 10 slices of 500 jobs per kind, each slice a write of its own (a few
    milliseconds of the write lock), instead of every expired job in one write; the next calls take the rest.
    A waited-for (/sync) result expires after its own TTL; a waited-for job that failed stays as long as any."""
    store = SQLiteStore(tmp_path)
    try:
        _finish_many(store, 6000, "api-1.sock")
        _finish_many(store, 6000, None)
        store.submit([NewJob("sync-failed", b"p", 1, 8, None, None, "api-1.sock")])
        store.claim(0, 1, "w", 30)
        store.finish([Outcome("sync-failed", 0, reason="it broke")], "w")
        assert _jobs_left(store) == 12_001
        now = time.time()
        store.maintain(now + 60, 3600, 1e9, waited_ttl=30)  # the /sync results only
        assert _jobs_left(store) == 12_001 - 5000
        store.maintain(now + 60, 3600, 1e9, waited_ttl=30)
        assert _jobs_left(store) == 6001 and "sync-failed" in store.get(["sync-failed"])
        store.maintain(now + 7200, 3600, 1e9, waited_ttl=30)  # now the others
        assert _jobs_left(store) == 1001
        store.maintain(now + 7200, 3600, 1e9, waited_ttl=30)
        assert _jobs_left(store) == 0
    finally:
        store.close()


def test_a_store_from_before_expiry_by_kind_gets_its_indexes(tmp_path: Path) -> None:
    """Stores made before kept one expiry index for every finished job (jobs_finished): it makes way for
    one per kind, and the /sync jobs those versions finished (their origin a bell's name) expire as such."""
    store = SQLiteStore(tmp_path)
    _finish_many(store, 10, "api-1.sock")
    store.close()
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript("DROP INDEX jobs_ended; DROP INDEX jobs_ended_waited;"
                     " CREATE INDEX jobs_finished ON jobs(finished) WHERE finished IS NOT NULL;"
                     " UPDATE jobs SET origin = 'api-1.sock', lease_until = 1, deadline = 2;")
    db.close()
    store = SQLiteStore(tmp_path)
    try:
        names = {r[0] for r in store._db().execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"jobs_ended", "jobs_ended_waited"} <= names and "jobs_finished" not in names, names
        store.maintain(time.time() + 60, 3600, 1e9, waited_ttl=30)
        assert _jobs_left(store) == 0
    finally:
        store.close()
