"""The document behind the live status page (``GET /status.json``): the service at a glance.

Everything in it is a running total or a current value (items predicted, requests answered,
latency histogram counts, queue depths, live loops); the page polls it about once a second and
derives rates and percentiles from the differences, so the server keeps no history and a page
left open costs one cheap read a second. Loops and queue depths come from the service's
snapshot (refreshed anyway); failures and the webhook outbox are read from the store at most
once per ``FRESH_SECONDS`` however many pages are open.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Optional, Sequence

from fastdeploy import __version__
from fastdeploy.errors import FastDeployError
from fastdeploy.jobs import BATCH_BUCKETS, STARTUP_FAILURE, WorkerInfo
from fastdeploy.service import Service
from fastdeploy.store.base import Failure, Outbox

FRESH_SECONDS = 1.0  # how stale the failures and the outbox may be
FAILURES_SHOWN = 10
FAILURES_READ = FAILURES_SHOWN  # the newest failures read: of every client, or (API keys on) of the key asking
OWNERS_CACHED = 256  # keys whose failures are kept between reads (the oldest read goes first)

RequestSummary = Callable[[], Mapping[str, Any]]
Warnings = Callable[[], Sequence[str]]


class StatusBoard:
    """Builds the status document of one API server process."""

    def __init__(self, service: Service, requests: RequestSummary, warnings: Warnings = tuple) -> None:
        """``requests``: the request counters and latency histogram of the API servers (``Metrics``);
        ``warnings``: what every reader should know of this server's configuration (like revoked API keys)."""
        self._service = service
        self._requests = requests
        self._warnings = warnings
        self._started = time.time()
        self._read_at: dict[Optional[str], float] = {}  # per owner (None: every client's failures)
        self._failures: dict[Optional[str], list[Failure]] = {}
        self._outbox: Optional[Outbox] = None
        self._store_error: Optional[str] = None

    async def document(self, owner: Optional[str] = None) -> dict[str, Any]:
        """The document; with ``owner`` (API keys on), the failures listed are that key's jobs only,
        read from the store's list of that key's own failures."""
        if time.monotonic() - self._read_at.get(owner, float("-inf")) >= FRESH_SECONDS:
            self._forget_oldest()
            self._read_at[owner] = time.monotonic()
            try:
                self._failures[owner], self._outbox = await self._service.bridge.call(self._read_store, owner)
                self._store_error = None
            except FastDeployError as exc:  # the page says so; the rest of it still shows
                self._store_error = exc.reason
        service, now = self._service, time.time()
        depths, workers = service.snapshot()
        reason = service.not_ready_reason()
        recipe = service.recipe
        return {
            "service": {
                "name": recipe.name, "input_type": recipe.input_type, "version": __version__,
                "ready": reason is None, "reason": reason, "started": self._started,
                "uptime_s": round(now - self._started, 1), "now": now, "stages": recipe.stages,
            },
            "stages": [_stage(stage, depths, workers, now) for stage in range(recipe.stages)],
            "requests": dict(self._requests()),
            "failures": [{"at": f.at, "unique_id": f.unique_id, "reason": f.reason}
                         for f in self._failures.get(owner, []) if owner is None or f.owner == owner][:FAILURES_SHOWN],
            "webhooks": None if self._outbox is None else {
                "pending": self._outbox.pending, "delivered": self._outbox.delivered, "failed": self._outbox.failed,
            },
            "store_error": self._store_error,
            "warnings": list(self._warnings()),
        }

    def _forget_oldest(self) -> None:
        """Keep the failures of at most OWNERS_CACHED keys (every key that opened a page would stay)."""
        while len(self._read_at) >= OWNERS_CACHED:
            oldest = min(self._read_at, key=self._read_at.__getitem__)
            del self._read_at[oldest]
            self._failures.pop(oldest, None)

    def _read_store(self, owner: Optional[str]) -> tuple[list[Failure], Outbox]:
        store = self._service.store
        return store.recent_failures(FAILURES_READ, owner), store.outbox()


def _stage(stage: int, depths: list[int], workers: list[WorkerInfo], now: float) -> dict[str, Any]:
    """One stage: its queue, its loops, and totals summed over the loops alive now."""
    mine = [w for w in workers if w.stage == stage and not w.stats.get(STARTUP_FAILURE)]
    cumulative = [0] * len(BATCH_BUCKETS)  # loops count calls of size <= each bound, as Prometheus does
    for worker in mine:
        for i, count in enumerate(worker.stats.get("batch_buckets", [])[: len(cumulative)]):
            cumulative[i] += int(count)
    histogram = [count - (cumulative[i - 1] if i else 0) for i, count in enumerate(cumulative)]

    def total(name: str) -> float:
        return sum(float(w.stats.get(name, 0)) for w in mine)

    return {
        "stage": stage,
        "queue_depth": depths[stage] if stage < len(depths) else 0,
        "items": int(total("items")),
        "batches": int(total("batches")),
        "failed_jobs": int(total("failed_jobs")),
        "predict_seconds": round(total("predict_seconds"), 3),
        "batch_sizes": {"bounds": list(BATCH_BUCKETS), "counts": histogram},  # calls per range of sizes
        "workers": [
            {"worker_id": w.worker_id, "host": w.host, "pid": w.pid, "device": w.stats.get("device"),
             "batch_size": w.batch_size, "ready": w.ready, "items": int(w.stats.get("items", 0)),
             "batches": int(w.stats.get("batches", 0)), "heartbeat_age_s": round(max(0.0, now - w.seen), 1)}
            for w in sorted(mine, key=lambda w: w.worker_id)
        ],
    }
