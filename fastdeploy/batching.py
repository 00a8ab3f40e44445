"""Pure batching decisions: the batch-size search and how long to wait for a fuller batch.

No processes or clocks are touched here except through the functions passed in, so
the logic is unit-tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

# Keep doubling while the time per input falls by at least this fraction.
MIN_GAIN = 0.10
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
    max_call_seconds: float = MAX_CALL_SECONDS,
) -> BatchChoice:
    """Double the batch size while the time per input keeps falling.

    ``measure(n)`` returns the seconds one predictor call on ``n`` inputs takes.
    """
    trials: list[tuple[int, float]] = []
    last_call = measure(1)
    best_size, best_per_item = 1, last_call
    trials.append((1, best_per_item))
    size = 1
    while size * 2 <= max_batch_size and last_call < max_call_seconds:
        size *= 2
        last_call = measure(size)
        per_item = last_call / size
        trials.append((size, per_item))
        if per_item > best_per_item * (1.0 - min_gain):
            if per_item < best_per_item:
                best_size, best_per_item = size, per_item
            break
        best_size, best_per_item = size, per_item
    return BatchChoice(best_size, best_per_item, tuple(trials))


def fill_wait_seconds(have: int, batch_size: int, seconds_per_item: float, max_wait: float, busy: bool) -> float:
    """How long to wait for more inputs before predicting ``have`` of ``batch_size``.

    Never wait when the loop was idle (a lone request goes straight through) or the batch
    is full; under load, wait up to ``max_wait`` times the time the missing inputs would take.
    """
    if not busy or have >= batch_size or max_wait <= 0:
        return 0.0
    return max_wait * seconds_per_item * (batch_size - have)


def cycle_to(example: Sequence[T], n: int) -> list[T]:
    """``n`` inputs made by repeating the example, for timing a batch of size ``n``."""
    if not example:
        raise ValueError("the example is empty")
    return [example[i % len(example)] for i in range(n)]
