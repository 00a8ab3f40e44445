"""The fair-share rule as a pure function: one job per lane per round, up to the batch."""

from __future__ import annotations

from typing import Optional

from fastdeploy.store.fairness import WeighedJob, fair_share


def lanes_of(**queues: list[int]):
    """``next_job`` over named lanes whose jobs hold the given numbers of inputs."""
    left = {lane: [(f"{lane}{i}", n) for i, n in enumerate(sizes)] for lane, sizes in queues.items()}

    def next_job(lane: str) -> Optional[WeighedJob[str]]:
        if not left[lane]:
            return None
        name, n = left[lane].pop(0)
        return WeighedJob(n, name)

    return next_job


def test_one_job_per_lane_per_round_in_the_lanes_order():
    taken = fair_share(["b", "a", "c"], lanes_of(a=[1] * 5, b=[1] * 5, c=[1]), 7)
    assert [job for _, job in taken] == ["b0", "a0", "c0", "b1", "a1", "b2", "a2"]


def test_a_lane_whose_job_would_overflow_the_batch_sits_out_while_others_fill_it():
    taken = fair_share(["a", "b", "c"], lanes_of(a=[2, 2], b=[3], c=[1, 1]), 4)
    # b0 (3 inputs) does not fit beside a0 (2); a1 does not fit beside a0 + c0 + c1... c goes on
    assert [job for _, job in taken] == ["a0", "c0", "c1"]


def test_an_oversized_first_job_is_still_taken_alone():
    assert [job for _, job in fair_share(["a"], lanes_of(a=[10, 1]), 4)] == ["a0"]


def test_empty_lanes_and_no_lanes():
    assert fair_share([], lanes_of(), 4) == []
    assert [job for _, job in fair_share(["a", "b"], lanes_of(a=[], b=[1, 1]), 4)] == ["b0", "b1"]
