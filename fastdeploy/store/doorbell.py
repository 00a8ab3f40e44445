"""The doorbell contract: how a process learns that something happened in the store.

A store records jobs; its doorbell, opened together with it, tells the processes that
care: a loop that jobs are waiting at its stage, an API server that a job it waits for
has finished (often with the outcome itself, so no read is needed). Rings are hints
only: one may be lost, so callers also poll the store now and then, and a lost ring
costs a short delay, never a job.

Each backend has its own doorbell: Unix datagram sockets beside the embedded store
(``local_doorbell``), Redis lists and pub/sub beside the Redis store (``redis_doorbell``).
How long a doorbell looks for a ring before it sleeps is its own business, decided here
and nowhere else. Doorbells never raise for a failing backend: they sleep instead.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
from typing import Callable, Optional, TypeVar

from fastdeploy.jobs import ResultNews

log = logging.getLogger(__name__)

T = TypeVar("T")
Deliver = Callable[[list[ResultNews]], None]

WATCH_POLL_SECONDS = 0.25  # longest single wait of the thread that watches for results


class Doorbell(abc.ABC):
    """Wakes loops when jobs wait, and API servers when their jobs finish."""

    # the counters in ``stats`` (name -> help text), exported as metrics by every backend
    STATS: dict[str, str] = {"spin_seconds": "Seconds spent polling for an expected ring instead of sleeping (SPIN_US)"}

    def __init__(self) -> None:
        # cumulative counters a process reports with its metrics (name -> value)
        self.stats: dict[str, float] = {name: 0.0 for name in self.STATS}
        self._watch_stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None

    @property
    def address(self) -> Optional[str]:
        """Where the store sends the outcomes of jobs this process waits for (``NewJob.origin``);
        None until ``listen_for_results``."""
        return None

    # -- loop side ------------------------------------------------------------
    def listen_for_jobs(self, stage: int) -> None:  # noqa: B027 (optional hook)
        """Prepare to hear of jobs at ``stage`` (a loop calls this before its first claim)."""

    @abc.abstractmethod
    def wait_for_jobs(self, stage: int, timeout: float) -> None:
        """Block up to ``timeout`` or until jobs may be waiting at ``stage``; the loop holds none."""

    def wait_for_more_jobs(self, stage: int, timeout: float) -> None:
        """Like ``wait_for_jobs``, while the loop holds a partial batch it hopes to fill."""
        self.wait_for_jobs(stage, timeout)

    def jobs_claimed(self, count: int) -> bool:
        """Told how many jobs each claim that found work took (the rhythm of arrivals).

        Returns whether more jobs may come while these are predicted, so that waiting a
        little for a fuller batch can pay: not so in a lone client's rhythm, whose next
        request cannot come before this answer.
        """
        return True

    # -- API side -------------------------------------------------------------
    def listen_for_results(self) -> None:  # noqa: B027 (optional hook)
        """Prepare to hear of finished jobs (an API server calls this at start-up)."""

    @abc.abstractmethod
    def wait_for_results(self, timeout: float) -> list[ResultNews]:
        """Block up to ``timeout`` for news of finished jobs (maybe none).

        News of a job whose ``origin`` is this doorbell's address reaches this process (as
        long as rings are not lost); news of other jobs may be left out.
        """

    def watch_results(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        """Call ``deliver(news)`` on ``loop`` whenever news arrives, until ``stop_watching``.

        By default a thread waits and hands the news over; a doorbell whose rings come to a
        socket lets the event loop watch that socket instead (no thread hop).
        """
        self._watch_stop.clear()

        def watch() -> None:
            while not self._watch_stop.is_set():
                try:
                    news = self.wait_for_results(WATCH_POLL_SECONDS)
                    if news and not self._watch_stop.is_set():
                        loop.call_soon_threadsafe(deliver, news)
                except Exception:  # a thread's top: log it, keep watching (the poll covers the gap)
                    log.exception("watching for results failed; retrying")
                    self._watch_stop.wait(WATCH_POLL_SECONDS)

        self._watcher = threading.Thread(target=watch, name="results", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2 * WATCH_POLL_SECONDS + 5.0)
            self._watcher = None

    async def wait_for_answer(self, answer: "asyncio.Future[T]", alone: Callable[[], bool]) -> T:
        """Wait for ``answer``, which ``deliver`` resolves when its job's news comes.

        ``alone()`` says whether this is the only request the process waits for; a
        doorbell may then look for the news sooner than its socket would wake the event loop.
        """
        return await answer

    def close(self) -> None:
        """Release sockets and connections."""
        self.stop_watching()

