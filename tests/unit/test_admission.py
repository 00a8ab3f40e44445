"""The queue bounds as counts: admitted jobs count at once, failed writes are let go, snapshots replace."""

from __future__ import annotations

import pytest

from fastdeploy.admission import Admission
from fastdeploy.errors import TooManyRequests, Unavailable


def test_a_burst_cannot_pass_the_per_owner_bound_before_any_write_ends():
    admission = Admission(queue_limit=1000, per_owner_limit=3)
    for _ in range(3):
        admission.admit("a")  # none of the writes has ended yet
    with pytest.raises(TooManyRequests, match="QUEUE_LIMIT_PER_KEY=3"):
        admission.admit("a")
    admission.admit("b")  # another owner is not held back


def test_a_failed_write_is_let_go_and_a_snapshot_replaces_the_own_counts():
    admission = Admission(queue_limit=5, per_owner_limit=10)
    admission.admit("a")
    admission.written("a", ok=False)
    assert admission.total() == 0
    for _ in range(2):
        admission.admit("a")
        admission.written("a", ok=True)
    assert admission.of("a") == 2
    admission.snapshot_starting()
    admission.admit("a")  # admitted while the snapshot is read: still counted after it
    admission.snapshot(2, {"a": 2})
    assert admission.of("a") == 3 and admission.total() == 3
    admission.written("a", ok=True)
    admission.admit("a")
    admission.admit("a")
    with pytest.raises(Unavailable, match="the queue is full"):
        admission.admit("b")


def test_check_refuses_as_admit_would_and_counts_nothing():
    admission = Admission(queue_limit=2, per_owner_limit=1)
    admission.check("a")  # an upload about to be read: nothing is counted for it
    assert admission.total() == 0 and admission.of("a") == 0
    admission.admit("a")
    with pytest.raises(TooManyRequests):
        admission.check("a")
    admission.admit("b")
    with pytest.raises(Unavailable, match="the queue is full"):
        admission.check("c")
    assert admission.total() == 2
