"""Webhook delivery from the store's outbox: retried with growing delays, never raising.

Each API server runs one sender. Deliveries are leased from the store, so with several
servers each webhook is POSTed by one of them at a time; a receiver that never answers
only occupies one of a bounded number of concurrent slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

import httpx

from fastdeploy.errors import FastDeployError
from fastdeploy.settings import Settings
from fastdeploy.store.base import Store, WebhookDelivery
from fastdeploy.tasks import keep_running

log = logging.getLogger(__name__)

StoreCall = Callable[..., Awaitable[Any]]

POLL_SECONDS = 0.2
OUTAGE_POLL_SECONDS = 2.0
CONCURRENCY = 32


def next_delay(settings: Settings, attempts_so_far: int) -> float:
    """Seconds before the next try: the base delay doubling with each failed attempt."""
    return settings.webhook_backoff * (2**attempts_so_far)


class WebhookSender:
    """Polls the outbox and POSTs due webhooks concurrently."""

    def __init__(self, settings: Settings, store: Store, call: StoreCall) -> None:
        self.settings = settings
        self.store = store
        self._call = call
        self._client: Optional[httpx.AsyncClient] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._outage = False

    async def run(self) -> None:
        """Deliver until cancelled."""
        self._client = httpx.AsyncClient(timeout=self.settings.webhook_timeout, follow_redirects=False)
        try:
            await keep_running("the webhook sender", self._tick)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await self._client.aclose()

    async def _tick(self) -> float:
        """Start the deliveries that are due; returns how long to wait before the next look."""
        free = CONCURRENCY - len(self._tasks)
        if free <= 0:
            return POLL_SECONDS
        try:
            deliveries = await self._call(self.store.claim_webhooks, free, self.settings.webhook_timeout + 5.0)
        except FastDeployError as exc:  # store down: say so once, try again shortly
            if not self._outage:
                log.warning("webhook outbox unavailable (retrying quietly): %s", exc.reason)
            self._outage = True
            return OUTAGE_POLL_SECONDS
        if self._outage:
            log.info("webhook outbox reachable again")
        self._outage = False
        for delivery in deliveries:
            task = asyncio.create_task(self._deliver(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return POLL_SECONDS

    async def _delivered(self, job_id: str) -> None:
        try:
            await self._call(self.store.webhook_delivered, job_id)
        except FastDeployError as exc:  # the lease runs out and it is sent once more: at least once
            log.warning("could not mark the webhook for %s delivered: %s", job_id, exc.reason)

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        assert self._client is not None
        error = ""
        try:
            response = await self._client.post(
                delivery.url, content=delivery.body, headers={"Content-Type": "application/json"}
            )
            if 200 <= response.status_code < 300:
                await self._delivered(delivery.job_id)
                return
            error = f"HTTP {response.status_code}"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:  # the receiver's fault, or its URL's
            error = f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        try:
            if attempts >= self.settings.webhook_attempts:
                log.warning("webhook for %s to %s abandoned after %d attempts: %s", delivery.job_id, delivery.url, attempts, error)
                await self._call(self.store.webhook_delivered, delivery.job_id)
            else:
                delay = next_delay(self.settings, delivery.attempts)
                log.info("webhook for %s failed (%s); retry %d in %.1f s", delivery.job_id, error, attempts, delay)
                await self._call(self.store.webhook_retry, delivery.job_id, time.time() + delay)
        except FastDeployError as exc:  # the lease runs out and another try happens later
            log.warning("could not record webhook attempt for %s: %s", delivery.job_id, exc.reason)
