"""The store contract: the only thing API servers and prediction loops share.

Every backend (embedded SQLite, Redis) implements this class and passes the same
contract test suite (tests/store/). The store is the truth for every job; doorbells
(``ring_*`` / ``wait_for_*``) only cut latency, so a lost ring costs a short poll,
never a job.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional, Sequence


from fastdeploy.jobs import ClaimedJob, JobView, NewJob, Outcome, ResultNews, WorkerInfo

# A job whose loop died this many times while holding it fails instead of killing more loops.
MAX_ATTEMPTS = 3
POISON_REASON = (
    "the prediction loop stopped {n} times while predicting this request; "
    "it was not retried again (check the predictor's memory use and logs)"
)


@dataclass(frozen=True)
class WebhookDelivery:
    """One pending webhook POST, claimed by one sender at a time."""

    job_id: str
    url: str
    body: bytes
    attempts: int


class Store(abc.ABC):
    """Jobs, leases, results, workers and the webhook outbox, behind one small API."""

    # -- API side -------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, jobs: Sequence[NewJob]) -> None:
        """Queue jobs at stage 0, durably, then ring the stage-0 loops."""

    @abc.abstractmethod
    def get(self, ids: Sequence[str]) -> dict[str, JobView]:
        """The current view of each known id; unknown or expired ids are left out."""

    @abc.abstractmethod
    def unfinished(self) -> int:
        """Jobs queued or processing at any stage (for the queue bound)."""

    @abc.abstractmethod
    def queue_depths(self, stages: int) -> list[int]:
        """Jobs waiting to be claimed, per stage."""

    @abc.abstractmethod
    def cancel(self, ids: Sequence[str], reason: str, error_status: int) -> list[str]:
        """Fail the jobs that are still queued (at any stage), so no loop predicts them.

        Jobs already being predicted, or finished, are left alone. Returns the ids failed.
        """

    @abc.abstractmethod
    def wait_for_results(self, timeout: float) -> list[ResultNews]:
        """Block up to ``timeout`` for news of finished jobs (maybe none).

        News of a job submitted with ``waited`` must reach the API server that submitted it
        (as long as rings are not lost); news of other jobs may be left out. A backend may
        carry the outcome itself, sparing the API server a read.
        """

    # -- loop side ------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, stage: int, max_items: int, worker_id: str, lease_seconds: float) -> list[ClaimedJob]:
        """Atomically lease queued jobs of ``stage`` in priority order, up to ``max_items`` inputs.

        Always returns at least one job when any is queued, even if it alone holds more
        than ``max_items`` inputs. Jobs whose deadline has passed are failed (timed out)
        instead of returned.
        """

    @abc.abstractmethod
    def finish(self, outcomes: Sequence[Outcome], worker_id: str) -> None:
        """Record each outcome once: move to the next stage, store the result, or fail.

        An outcome for a job that already finished or moved on (it was predicted twice
        after a lease ran out) is ignored, so a result is delivered once.
        """

    @abc.abstractmethod
    def wait_for_jobs(self, stage: int, timeout: float, spin: float = 0.0) -> None:
        """Block up to ``timeout`` or until a ring says jobs are waiting at ``stage``.

        ``spin``: where rings are local, look for one without sleeping for up to this
        long first (see ``fastdeploy.rhythm``); other backends ignore it."""

    # -- workers --------------------------------------------------------------
    @abc.abstractmethod
    def heartbeat(self, info: WorkerInfo, lease_seconds: float) -> None:
        """Record a loop as alive and extend the leases of the jobs it holds."""

    @abc.abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every loop that reported itself recently enough to be listed."""

    @abc.abstractmethod
    def release_worker(self, worker_id: str) -> int:
        """Forget a loop and put the jobs it held back in the queue; returns how many."""

    # -- maintenance ----------------------------------------------------------
    @abc.abstractmethod
    def maintain(self, now: float, result_ttl: float, worker_timeout: float) -> None:
        """Requeue jobs of lapsed leases or silent workers, expire old results and workers."""

    # -- webhook outbox -------------------------------------------------------
    @abc.abstractmethod
    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
        """Lease due webhook deliveries so only one sender tries each at a time."""

    @abc.abstractmethod
    def webhook_delivered(self, job_id: str) -> None:
        """Remove a delivered (or abandoned) webhook from the outbox."""

    @abc.abstractmethod
    def webhook_retry(self, job_id: str, next_attempt_at: float) -> None:
        """Count a failed attempt and schedule the next one."""

    # -- optional fast paths ---------------------------------------------------
    def peek(self, stage: int) -> Optional[ClaimedJob]:
        """The job at the head of ``stage``'s queue, read but not leased; None when there is
        none or the backend cannot tell cheaply (the caller then claims as usual).

        For a stage that one loop serves alone, in a lone client's rhythm: a lease is a
        write, and nothing competes for the job. ``finish`` accepts a job that is still
        queued, a job cancelled or timed out meanwhile is not finished twice, and a loop
        that dies leaves the job queued for the next one.
        """
        return None

    def try_submit(self, jobs: Sequence[NewJob]) -> bool:
        """Submit at once if that needs no waiting at all (no network, no lock held by
        another writer); False means nothing was written and ``submit`` must be used.

        Lets an API server write a lone request from its event loop without a thread hop.
        """
        return False

    def result_ring_fileno(self) -> Optional[int]:
        """A socket an event loop can watch for result rings, if the backend has one.

        Without one, an API server waits in ``wait_for_results`` on a thread instead.
        """
        return None

    def poll_result_rings(self, seconds: float) -> bool:
        """Whether a result ring is waiting, looking for up to ``seconds`` without sleeping
        (only where rings come to ``result_ring_fileno``; others answer False at once)."""
        return False

    def take_result_rings(self) -> list[ResultNews]:
        """News from result rings already waiting, without blocking."""
        return self.wait_for_results(0.0)

    # -- lifecycle ------------------------------------------------------------
    def listen_for_jobs(self, stage: int) -> None:  # noqa: B027 (optional hook)
        """Prepare to receive rings for ``stage`` (a loop calls this before claiming)."""

    def listen_for_results(self) -> None:  # noqa: B027 (optional hook)
        """Prepare to receive result rings (an API server calls this at start-up)."""

    def checkpoint(self) -> None:  # noqa: B027 (optional hook)
        """Fold the store's write-ahead log into its main file, where that is this process's
        job (one process per host calls this now and then, off the request path)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections and doorbell sockets."""
