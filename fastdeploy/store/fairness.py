"""Fair share between clients: which queued jobs one claim takes, lane by lane.

Every job belongs to a lane: its owner (the API key that submitted it, or without keys
the client's address) at its stage. A claim takes one job from each lane in turn,
starting after the lane the previous claim ended with, round after round, until the
batch is full. So a client that queued 10,000 jobs, at any priority, delays another
client's next job by at most about one batch, while within a lane the owner's own
priorities (then arrival) keep their order. The embedded store runs this function; the
Redis store runs the same rule inside its claim script, where it must be atomic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Optional, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class WeighedJob(Generic[T]):
    """A lane's next job and how many inputs it holds."""

    n_items: int
    job: T


def fair_share(
    lanes: Sequence[str], next_job: Callable[[str], Optional[WeighedJob[T]]], max_items: int
) -> list[tuple[str, T]]:
    """Jobs taken one per lane per round, in the lanes' order, up to ``max_items`` inputs.

    ``next_job(lane)`` hands out the lane's next job (None once it has none). At least one
    job is taken when any lane has one, even if it alone holds more than ``max_items``. A
    lane whose next job would overflow the batch is left for this claim (the job stays
    queued, first in its lane) while the other lanes go on filling it.
    """
    taken: list[tuple[str, T]] = []
    items = 0
    live = list(lanes)
    while live and items < max_items:
        still: list[str] = []
        for lane in live:
            if taken and items >= max_items:
                break
            job = next_job(lane)
            if job is None:
                continue
            if taken and items + job.n_items > max_items:
                continue  # too big for what is left: this lane sits the claim out
            taken.append((lane, job.job))
            items += job.n_items
            still.append(lane)
        live = still
    return taken
