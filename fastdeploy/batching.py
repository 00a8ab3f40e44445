"""Pure batching decisions: the batch-size search and how long to wait for a fuller batch.

No processes or clocks are touched here except through the functions passed in, so
the logic is unit-tested directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

# A larger batch counts as better only when it cuts the time per input by this fraction.
MIN_GAIN = 0.02
# Doublings in a row without a better time before the search ends (one dip does not end it).
PATIENCE = 2
# Among the sizes within this fraction of the best time per input, take the smallest: the
# throughput is nearly the same and each batch waits and runs for less time.
TOLERANCE = 0.05
# Stop growing the batch once one call takes longer than this (seconds): bigger ones only add latency.
MAX_CALL_SECONDS = 2.0


@dataclass(frozen=True)
class BatchChoice:
    batch_size: int
    seconds_per_item: float
    trials: tuple[tuple[int, float], ...]  # (batch size, seconds per item) measured


def search_batch_size(
    measure: Callable[[int], float],
    max_batch_size: int,
    *,
    min_gain: float = MIN_GAIN,
    patience: int = PATIENCE,
    tolerance: float = TOLERANCE,
    max_call_seconds: float = MAX_CALL_SECONDS,
) -> BatchChoice:
    """Try batch sizes 1, 2, 4, … and choose the one with the fastest time per input.

    ``measure(n)`` returns the seconds one predictor call on ``n`` inputs takes. The search
    ends at ``max_batch_size``, after ``patience`` doublings without a gain of ``min_gain``,
    or once a call takes longer than ``max_call_seconds``. The choice is the smallest size
    within ``tolerance`` of the best time per input.
    """
    trials: list[tuple[int, float]] = []
    size, best, misses = 1, float("inf"), 0
    while True:
        call = measure(size)
        per_item = call / size
        trials.append((size, per_item))
        if per_item < best * (1.0 - min_gain):
            best, misses = per_item, 0
        else:
            best, misses = min(best, per_item), misses + 1
        if misses >= patience or size * 2 > max_batch_size or call >= max_call_seconds:
            break
        size *= 2
    fastest = min(per_item for _, per_item in trials)
    chosen = min(
        (size, per_item) for size, per_item in trials if per_item <= fastest * (1.0 + tolerance)
    )
    return BatchChoice(chosen[0], chosen[1], tuple(trials))


def trial_table(trials: Sequence[tuple[int, float]], chosen: int) -> list[str]:
    """The batch-size search as rows a person reads: batch size, milliseconds per input, the choice marked."""
    rows = ["batch size | ms per input"]
    for size, per_item in trials:
        mark = "  <- chosen" if size == chosen else ""
        rows.append(f"{size:>10} | {milliseconds(per_item):>12}{mark}")
    return rows


def milliseconds(seconds: float) -> str:
    """``seconds`` in milliseconds to three significant digits, never in exponent form (0.0000891)."""
    ms = seconds * 1000
    if ms <= 0 or not math.isfinite(ms):
        return f"{ms:.1f}"
    return f"{ms:.{max(1, 2 - math.floor(math.log10(ms)))}f}"


def per_item_at(size: int, trials: Sequence[tuple[int, float]]) -> float:
    """Measured seconds per input for a batch of ``size``: the largest measured size not above it."""
    below = [(n, per_item) for n, per_item in trials if n <= size]
    return max(below)[1] if below else min(trials)[1]


def fill_wait_seconds(
    have: int,
    batch_size: int,
    seconds_per_item: float,
    max_wait: float,
    busy: bool,
    trials: Sequence[tuple[int, float]] = (),
    tolerance: float = TOLERANCE,
) -> float:
    """How long to wait for more inputs before predicting ``have`` of ``batch_size``.

    Never wait when the loop was idle (a lone request goes straight through) or the batch
    is full, nor when the measured ``trials`` show that ``have`` inputs already run within
    ``tolerance`` of the chosen size's time per input: waiting would leave the model idle
    for nothing (a model on one thread often gains little from batching). Otherwise, under
    load, wait up to ``max_wait`` times the time the missing inputs would take.
    """
    if not busy or have >= batch_size or max_wait <= 0:
        return 0.0
    if len(trials) > 1 and per_item_at(have, trials) <= per_item_at(batch_size, trials) * (1.0 + tolerance):
        return 0.0
    return max_wait * seconds_per_item * (batch_size - have)


def cycle_to(example: Sequence[T], n: int) -> list[T]:
    """``n`` inputs made by repeating the example, for timing a batch of size ``n``."""
    if not example:
        raise ValueError("the example is empty")
    return [example[i % len(example)] for i in range(n)]
