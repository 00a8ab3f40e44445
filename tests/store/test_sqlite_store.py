"""What only the embedded SQLite store does: large inputs in a table of their own."""

from __future__ import annotations

import sqlite3

from fastdeploy.jobs import NewJob, Outcome
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
