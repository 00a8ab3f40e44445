"""Which worker of a state folder counts as the first (the one that may requeue the jobs of the loops
recorded before it), on the real lock files.

A worker looks by taking ``loops.lock`` alone, then turning that into a share; flock does that in two
steps, with nothing held in between. A second worker looking in that gap saw nobody either: both counted
as alone and requeued each other's jobs. These tests hold a worker in exactly that gap.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from fastdeploy import state_folder
from fastdeploy.state_folder import LOOPS_LOCK_FILE, LOOPS_PROBE_FILE, FolderLock


def _worker_in_the_gap(folder: Path) -> int:
    """A worker in the middle of its look: it holds the probe, and nothing on loops.lock yet. Returns
    the probe's descriptor; the look ends with ``_end_the_look``."""
    state_folder.create_state_folder(folder)
    probe = os.open(folder / LOOPS_PROBE_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(probe, fcntl.LOCK_EX)
    return probe


def _end_the_look(folder: Path, probe: int) -> int:
    """The worker in the gap takes its share of loops.lock, then lets the next look."""
    loops = os.open(folder / LOOPS_LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(loops, fcntl.LOCK_SH)
    os.close(probe)
    return loops


def test_a_worker_starting_during_another_workers_look_is_not_alone(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    probe = _worker_in_the_gap(folder)
    held: list[FolderLock] = []
    second = threading.Thread(target=lambda: held.append(state_folder.hold(folder, "worker")))
    second.start()
    second.join(0.5)
    assert not held, "the second worker looked while the first was between its two steps"
    loops = _end_the_look(folder, probe)
    second.join(10)
    try:
        assert len(held) == 1 and held[0].alone is False
    finally:
        for lock in held:
            lock.release()
        os.close(loops)


def test_the_first_worker_is_alone_and_the_next_is_not(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    first = state_folder.hold(folder, "worker")
    second = state_folder.hold(folder, "worker")
    try:
        assert (first.alone, second.alone) == (True, False)
    finally:
        second.release()
        first.release()
    again = state_folder.hold(folder, "worker")  # both gone: the next one is the first again
    try:
        assert again.alone is True
    finally:
        again.release()
