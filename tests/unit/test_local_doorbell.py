"""The local doorbell: when a loop and an API server poll instead of sleeping (the lone
rhythm), and the poll itself on a real Unix datagram socket."""

from __future__ import annotations

import socket
import threading
import time

from fastdeploy.store.local_doorbell import STREAK, LocalDoorbell, LoneRhythm


def test_spins_only_after_a_streak_of_prompt_lone_jobs():
    rhythm = LoneRhythm(0.001)
    for _ in range(STREAK - 1):
        rhythm.observe(True, 0.0003)
        assert rhythm.spin_seconds() == 0.0
    rhythm.observe(True, 0.0003)
    assert rhythm.spin_seconds() == 0.001


def test_a_crowd_or_a_slow_gap_ends_the_streak():
    rhythm = LoneRhythm(0.001)
    for _ in range(STREAK):
        rhythm.observe(True, 0.0001)
    rhythm.observe(False, 0.0001)  # another request was in flight: load, not a lone client
    assert rhythm.spin_seconds() == 0.0
    for _ in range(STREAK):
        rhythm.observe(True, 0.0001)
    rhythm.observe(True, 0.002)  # longer than the budget: spinning would have missed it
    assert rhythm.spin_seconds() == 0.0


def test_zero_budget_never_spins():
    rhythm = LoneRhythm(0.0)
    for _ in range(3 * STREAK):
        rhythm.observe(True, 0.0)
    assert rhythm.spin_seconds() == 0.0


def _ring_later(bell_path: str, delay: float) -> threading.Thread:
    def ring() -> None:
        time.sleep(delay)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", bell_path)

    thread = threading.Thread(target=ring)
    thread.start()
    return thread


def _ring(bell: LocalDoorbell, message: bytes = b"") -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(message, str(bell._folder / bell.address))


def _lone_arrivals(bell: LocalDoorbell, count: int) -> None:
    """``count`` times: one ring, an idle wait that it ends, a claim of one job."""
    for _ in range(count):
        _ring(bell)
        bell.wait_for_jobs(0, 1.0)
        assert bell.stats["spin_seconds"] == 0.0  # not yet in rhythm: it slept
        bell.jobs_claimed(1)


def test_a_loop_polls_only_after_a_streak_of_lone_prompt_arrivals(tmp_path):
    bell = LocalDoorbell(tmp_path, spin_seconds=0.05)
    bell.listen_for_jobs(0)
    try:
        _lone_arrivals(bell, STREAK)
        bell.wait_for_jobs(0, 0.01)  # in rhythm: polls up to the budget (here the timeout) first
        assert bell.stats["spin_seconds"] > 0.0
        polled = bell.stats["spin_seconds"]
        bell.wait_for_more_jobs(0, 0.01)  # filling a batch means load: the rhythm ends
        bell.wait_for_jobs(0, 0.01)
        assert bell.stats["spin_seconds"] == polled
    finally:
        bell.close()


def test_two_jobs_at_once_or_a_busy_claim_break_the_streak(tmp_path):
    bell = LocalDoorbell(tmp_path, spin_seconds=0.05)
    bell.listen_for_jobs(0)
    try:
        _lone_arrivals(bell, STREAK - 1)
        bell.jobs_claimed(3)  # a claim right after a batch found work: load
        _lone_arrivals(bell, 1)
        bell.wait_for_jobs(0, 0.01)
        assert bell.stats["spin_seconds"] == 0.0
    finally:
        bell.close()


def test_poll_finds_a_ring_that_comes_while_polling(tmp_path):
    bell = LocalDoorbell(tmp_path)
    bell.listen_for_jobs(0)
    try:
        thread = _ring_later(str(tmp_path / bell.address), 0.01)
        assert bell._poll(5.0) is True  # returns when the ring lands, long before 5 s
        thread.join()
        assert bell._drain() == [b"x"]
    finally:
        bell.close()


def test_poll_gives_up_after_its_time_and_wait_then_sleeps_until_the_ring(tmp_path):
    bell = LocalDoorbell(tmp_path)
    bell.listen_for_jobs(0)
    try:
        started = time.perf_counter()
        assert bell._poll(0.005) is False
        assert time.perf_counter() - started >= 0.005
        thread = _ring_later(str(tmp_path / bell.address), 0.05)
        assert bell._receive(5.0, spin=0.001) == [b"x"]  # the spin misses it; the sleep catches it
        thread.join()
    finally:
        bell.close()
