"""Whether one more job may come in: the queue bound, and a fast refusal at the per-client bound.

The store's counts arrive in snapshots (every half second); between two, an API server
adds what it accepted itself. A job is counted the moment it is admitted, before its
write is awaited, so a burst of requests in one event-loop turn cannot all pass a bound
that only the first should have passed. Counts of other API servers arrive with the next
snapshot: with several API servers the queue bound may be passed by what the others
accepted in that half second.

The per-client bound is exact all the same: the store checks it again in the write that
queues a job (``Store.submit``'s ``owner_limit``), across every API server. The check here
only spares that write, and the reading of a long upload, when this server already knows
the answer is no.
"""

from __future__ import annotations

from typing import Mapping

from fastdeploy.errors import TooManyRequests, Unavailable, owner_limit_reason


class Admission:
    """Unfinished jobs, total and per owner: the last snapshot plus this process's own since."""

    def __init__(self, queue_limit: int, per_owner_limit: int) -> None:
        self.queue_limit = queue_limit
        self.per_owner_limit = per_owner_limit
        self._store_total = 0
        self._store_by_owner: dict[str, int] = {}
        self._since_total = 0  # written after the current snapshot's read began
        self._since: dict[str, int] = {}
        self._in_flight_total = 0  # admitted, write not finished yet
        self._in_flight: dict[str, int] = {}

    def total(self) -> int:
        return self._store_total + self._since_total + self._in_flight_total

    def of(self, owner: str) -> int:
        return self._store_by_owner.get(owner, 0) + self._since.get(owner, 0) + self._in_flight.get(owner, 0)

    def admit(self, owner: str) -> None:
        """Count one job in, or refuse it: 503 over the queue bound, 429 over the owner's."""
        self.check(owner)
        self._in_flight_total += 1
        if self.per_owner_limit:  # per-owner counts only where a per-owner bound needs them
            self._in_flight[owner] = self._in_flight.get(owner, 0) + 1

    def check(self, owner: str) -> None:
        """Refuse as ``admit`` would, counting nothing (a request that still has its body to read)."""
        if self.total() >= self.queue_limit:
            raise Unavailable(
                f"the queue is full ({self.total()} unfinished jobs, limit {self.queue_limit}); retry later",
                retry_after=2.0,
            )
        if self.per_owner_limit and self.of(owner) >= self.per_owner_limit:
            raise TooManyRequests(owner_limit_reason(self.of(owner), self.per_owner_limit))

    def written(self, owner: str, ok: bool) -> None:
        """An admitted job's write ended: it stays counted if it was written, else it is let go."""
        self._in_flight_total -= 1
        if ok:
            self._since_total += 1
        if not self.per_owner_limit:
            return
        left = self._in_flight.get(owner, 0) - 1
        if left > 0:
            self._in_flight[owner] = left
        else:
            self._in_flight.pop(owner, None)
        if ok:
            self._since[owner] = self._since.get(owner, 0) + 1

    def snapshot_starting(self) -> None:
        """A read of the store's counts begins: jobs written before now are in it."""
        self._since_total = 0
        self._since = {}

    def snapshot(self, total: int, by_owner: Mapping[str, int]) -> None:
        self._store_total = total
        self._store_by_owner = dict(by_owner)
