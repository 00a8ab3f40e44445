"""When the loop and the API server poll instead of sleeping (fastdeploy.rhythm), and the
poll itself on a real Unix datagram bell."""

from __future__ import annotations

import socket
import threading
import time

from fastdeploy.rhythm import STREAK, LoneRhythm
from fastdeploy.store.bells import Bell


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


def test_poll_finds_a_ring_that_comes_while_polling(tmp_path):
    bell = Bell(tmp_path)
    bell.listen("loop")
    try:
        thread = _ring_later(str(tmp_path / bell.name), 0.01)
        assert bell.poll(5.0) is True  # returns when the ring lands, long before 5 s
        thread.join()
        assert bell.wait(0.0) == [b"x"]
    finally:
        bell.close()


def test_poll_gives_up_after_its_time_and_wait_then_sleeps_until_the_ring(tmp_path):
    bell = Bell(tmp_path)
    bell.listen("loop")
    try:
        started = time.perf_counter()
        assert bell.poll(0.005) is False
        assert time.perf_counter() - started >= 0.005
        thread = _ring_later(str(tmp_path / bell.name), 0.05)
        assert bell.wait(5.0, spin=0.001) == [b"x"]  # the spin misses it; the sleep catches it
        thread.join()
    finally:
        bell.close()
