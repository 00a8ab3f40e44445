"""When to look for the next ring without sleeping: only in the rhythm of a lone client.

A process that sleeps until a ring wakes it pays for the wake-up; on a virtual machine
whose idle cores halt, that is tens of microseconds per hop, and one /sync request makes
two such hops (API server -> loop -> API server). When one client sends request after
request, the next ring comes within a fraction of a millisecond, so polling for it for a
bounded while is cheaper than sleeping. Under load nobody sleeps anyway, and polling then
would only take cores from the processes doing the work: so spinning is allowed only
after a streak of lone jobs that each came soon after the last.
"""

from __future__ import annotations

STREAK = 8  # lone, prompt jobs in a row before spinning starts


class LoneRhythm:
    """Counts lone jobs that arrived within the spin budget; says how long to spin."""

    def __init__(self, budget_seconds: float, streak: int = STREAK) -> None:
        self.budget = max(0.0, budget_seconds)
        self._needed = streak
        self._streak = 0

    def observe(self, lone: bool, gap_seconds: float) -> None:
        """Record one job: whether nothing else was in flight, and how long it was waited for."""
        if lone and gap_seconds <= self.budget:
            self._streak = min(self._streak + 1, self._needed)
        else:
            self._streak = 0

    def spin_seconds(self) -> float:
        """How long to poll before sleeping: the budget while in rhythm, else 0."""
        return self.budget if self.budget > 0 and self._streak >= self._needed else 0.0
