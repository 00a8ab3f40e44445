"""The store contract: the only thing API servers and prediction loops share, about jobs only.

Every backend (embedded SQLite, Redis) implements this class and passes the same
contract test suite (tests/store/). The store is the truth for every job. How a process
learns that something changed (a job queued, a job finished) is not the store's
business: that is the doorbell next to each store (``store/doorbell.py``), opened with it.

One error contract: every public method of a backend raises ``StoreUnavailable`` and
nothing else for a failure of the backend; ``Store.__init_subclass__`` wraps each one, so a
backend cannot forget (its ``backend_errors`` name what its library raises).
"""

from __future__ import annotations

import abc
import functools
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Sequence

from fastdeploy.errors import StoreUnavailable
from fastdeploy.jobs import Binding, ClaimedJob, JobState, JobStatus, JobView, NewJob, Outcome, WorkerInfo

log = logging.getLogger(__name__)

# What ``Store.upgrade`` asks of a job's payload: the payload in this version's signed form, or None.
Resign = Callable[[bytes, Binding], Optional[bytes]]

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


@dataclass(frozen=True)
class Failure:
    """A job that failed, as the status page lists it: when, which, why, and whose (its owner)."""

    at: float
    unique_id: str
    reason: str
    owner: str = ""


@dataclass(frozen=True)
class Outbox:
    """The webhook outbox: deliveries waiting now, and those delivered or given up so far."""

    pending: int
    delivered: int
    failed: int


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with its backend's errors turned into StoreUnavailable."""

    @functools.wraps(method)
    def guarded(self: "Store", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreUnavailable:
            raise
        except self.backend_errors as exc:
            raise self._unavailable(method.__name__, exc) from None

    guarded.__guarded__ = True  # type: ignore[attr-defined]
    return guarded


class Store(abc.ABC):
    """Jobs, leases, results, workers and the webhook outbox, behind one small API."""

    # what the backend's library raises when the backend fails (disk, network, lock, corruption)
    backend_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError,)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Wrap every public method a backend defines, so only StoreUnavailable leaves it."""
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if inspect.isfunction(value) and not name.startswith("_") and not getattr(value, "__guarded__", False):
                setattr(cls, name, _guarded(value))

    def _unavailable(self, operation: str, exc: BaseException) -> StoreUnavailable:
        """The error a failed ``operation`` surfaces as; backends name themselves in the reason."""
        log.warning("the job store failed in %s: %s", operation, exc)
        return StoreUnavailable(f"the job store failed: {exc}")

    # -- API side -------------------------------------------------------------
    @abc.abstractmethod
    def submit(self, jobs: Sequence[NewJob], *, block: bool = True, owner_limit: int = 0) -> bool:
        """Queue jobs at stage 0, durably, and say so to the stage-0 loops' doorbells.

        ``block=False``: write only if that needs no waiting at all (no network, no lock
        held by another writer), so an API server may write a lone request from its event
        loop; False means nothing was written (the caller then submits with ``block=True``).
        A job's ``origin`` is where its outcome is sent when it finishes.

        A job id the store still holds (queued, running, or finished and not yet expired), or one
        that ``jobs`` holds twice, raises ``JobExists`` naming those ids, and nothing is written:
        clients may choose their own ids.

        ``owner_limit`` (0: none) bounds each owner's unfinished jobs (queued or processing, at any
        stage), checked in the same atomic write, so the bound holds however many API servers
        write: the jobs that would take an owner past it, the last of that owner's in ``jobs``,
        raise ``OwnerLimitReached`` naming them, and nothing is written. ``JobExists`` is checked first.
        """

    @abc.abstractmethod
    def get(self, ids: Sequence[str], owner: Optional[str] = None) -> dict[str, JobView]:
        """The current view of each known id; unknown or expired ids are left out, and with
        ``owner``, jobs of other owners too (their results are not read: they may be large)."""

    @abc.abstractmethod
    def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        """Status and owner of each known id, never its result (``get`` without the read of a
        result that may be large); unknown or expired ids are left out."""

    @abc.abstractmethod
    def unfinished(self) -> int:
        """Jobs queued or processing at any stage (for the queue bound)."""

    @abc.abstractmethod
    def queue_depths(self, stages: int) -> list[int]:
        """Jobs waiting to be claimed, per stage."""

    @abc.abstractmethod
    def cancel(
        self, ids: Sequence[str], reason: str, error_status: int, *, status: JobStatus = JobStatus.FAILED,
        running: bool = False,
    ) -> list[str]:
        """End the jobs that are still queued (at any stage) with ``status`` and ``reason``, so no
        loop predicts them; with ``running``, jobs being predicted too (their outcome is then
        discarded: ``finish`` ignores a job that ended). Finished jobs are left alone; a job
        with a webhook gets it. Returns the ids ended."""

    @abc.abstractmethod
    def unfinished_by_owner(self) -> dict[str, int]:
        """Jobs queued or processing per owner (for the per-client queue bound)."""

    # -- loop side ------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, stage: int, max_items: int, worker_id: str, lease_seconds: float) -> list[ClaimedJob]:
        """Atomically lease queued jobs of ``stage`` in priority order, up to ``max_items`` inputs.

        Always returns at least one job when any is queued, even if it alone holds more
        than ``max_items`` inputs. Jobs whose deadline has passed are failed (timed out)
        instead of returned.
        """

    @abc.abstractmethod
    def finish(self, outcomes: Sequence[Outcome], worker_id: str) -> list[str]:
        """Record each outcome once: move to the next stage, store the result, or fail.

        An outcome for a job that already finished or moved on (it was predicted twice
        after a lease ran out) is ignored, so a result is delivered once. The outcome of a
        job with an ``origin`` is sent to that address (the doorbell of the API server that
        waits for it); the loops of the next stage are told of jobs moved on to them.

        Returns the ids of those jobs that no other loop holds at the outcome's stage now:
        only their inputs at that stage (uploaded files) may be deleted. A loop whose lease
        ran out may still record first, but the loop that claimed the job again is reading them.
        """

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
    def upgrade(self, resign: Optional[Resign] = None) -> int:
        """Bring jobs an earlier version wrote up to this version's layout, at start-up (the
        supervisor calls it; several at once are safe); returns how many jobs it changed.
        ``resign(payload, binding)`` gives an unfinished job's payload in this version's signed
        form, or None to leave it as it is (``jobs.upgraded_payload``). A backend whose schema is
        upgraded when it opens and that keeps no payloads of an older form has nothing to do."""
        return 0

    @abc.abstractmethod
    def maintain(
        self, now: float, result_ttl: float, worker_timeout: float, waited_ttl: Optional[float] = None,
    ) -> None:
        """Requeue jobs of lapsed leases or silent workers, expire old results and workers.

        A job ends ``result_ttl`` seconds after it finished; one whose caller waited for it (it had
        an ``origin``: /sync) after ``waited_ttl`` (None: ``result_ttl``), since that caller has it
        already. Expiry goes a bounded slice at a time, so each call holds the store briefly however
        much is due (what is left waits for the next call, which API servers make twice a second)."""

    # -- webhook outbox -------------------------------------------------------
    @abc.abstractmethod
    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
        """Lease due webhook deliveries so only one sender tries each at a time."""

    @abc.abstractmethod
    def webhook_delivered(self, job_id: str) -> None:
        """Record a delivery: it leaves the outbox, and ``get`` shows it ``delivered`` (and when)."""

    @abc.abstractmethod
    def webhook_retry(self, job_id: str, next_attempt_at: float) -> None:
        """Count a failed attempt (when it ended, not why: see ``WebhookState``) and schedule the next one."""

    @abc.abstractmethod
    def webhook_failed(self, job_id: str) -> None:
        """Give a webhook up: it leaves the outbox, and ``get`` shows it ``failed`` (and when)."""

    # -- what an operator sees -------------------------------------------------
    @abc.abstractmethod
    def recent_failures(self, limit: int, owner: Optional[str] = None) -> list[Failure]:
        """The last ``limit`` jobs that failed, newest first, with their owners (cheap: read once a second
        per open page). With ``owner``, that owner's only, kept per owner: a page shows a key its own,
        and another key's flood of failures does not push them out."""

    @abc.abstractmethod
    def outbox(self) -> Outbox:
        """Webhooks waiting, and webhooks delivered and given up since the store was created."""

    # -- lifecycle ------------------------------------------------------------
    def checkpoint(self) -> None:  # noqa: B027 (optional hook)
        """Fold the store's write-ahead log into its main file and give space freed by expired jobs
        back to the disk, where that is this process's job (one process per host calls this now and
        then, off the request path)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""
