"""Webhook delivery from the store's outbox: retried with growing delays, never raising.

Each API server runs one sender. Deliveries are leased from the store, so with several
servers each webhook is POSTed by one of them at a time; a receiver that never answers
only occupies one of a bounded number of concurrent slots, for at most --webhook-timeout.

What a delivery trusts and is trusted with:
- signed per the Standard Webhooks specification when --webhook-secret is set
  (``webhook-id`` = ``msg_<job id>`` on every retry, ``webhook-timestamp`` per attempt);
- the host is checked against --webhook-hosts again at send time, since the URL comes from the store;
- the host is resolved once, every address it resolves to is checked (link-local and
  metadata addresses always refused, loopback and private ones unless --webhook-allow-private
  or the host is named in --webhook-hosts), and the connection goes to a checked address, so
  a second DNS answer cannot swap it; redirects are not followed;
- only the status line and headers of the reply are read: a huge reply costs nothing;
- why an attempt failed (refused, no answer, HTTP 503, ...) goes to the log with the job's id
  and the address, never into the store: /result shows a client only the outcome, how many
  attempts and when, so it cannot learn what listens at the addresses it names;
- nor from timing: a failed attempt is recorded (counted, and its retry scheduled) only once its
  --webhook-timeout has run out, however it failed, so a refused connection, a silent port, an
  HTTP error and a forbidden address all look the same in /result, when they happen included.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from fastdeploy.errors import FastDeployError
from fastdeploy.logs import about_job
from fastdeploy.payloads import (
    IPAddress, address_refusal, check_host_name, listed_host, literal_address, private_allowed,
)
from fastdeploy.settings import Settings, webhook_signing_key
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


def signature_headers(signer: Webhook, job_id: str, body: bytes, now: float) -> dict[str, str]:
    """Standard Webhooks headers: the id stays the same on every retry, so receivers can deduplicate."""
    message_id, timestamp = f"msg_{job_id}", int(now)
    signature = signer.sign(message_id, datetime.fromtimestamp(timestamp, tz=timezone.utc), body.decode())
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def loggable_url(url: str) -> str:
    """scheme://host:port/path: what a log line needs, without credentials or a query that may hold tokens."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an invalid URL)"
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname or ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class Refused(Exception):
    """A webhook that must not be sent: its URL is unusable or its host resolves to a forbidden address.
    It counts as a failed attempt like any other (and is retried: DNS may change), so that /result
    does not tell a client which names resolve to addresses webhooks may not reach."""


@dataclass(frozen=True)
class Target:
    """One checked address to POST to: the URL with that address as host, and the real host for Host and TLS."""

    url: str
    host_header: str
    tls_host: Optional[str]


def _targets_for(url: str, host: str, port: int, addresses: list[IPAddress]) -> list[Target]:
    parts = urlsplit(url)
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed + (f":{parts.port}" if parts.port else "")
    tail = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    tls_host = host if parts.scheme == "https" else None
    return [Target(f"{parts.scheme}://{_url_host(a)}:{port}{tail}", host_header, tls_host) for a in addresses]


def _url_host(address: IPAddress) -> str:
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


async def resolve_targets(url: str, allowed_hosts: frozenset[str], allow_private: bool) -> list[Target]:
    """Check the host against --webhook-hosts, resolve it once and check every address; Refused if the
    host is not listed or any address is forbidden (DNS cannot pick one later).

    Everything is checked again here, not only at submit: the URL may come from a store anyone with
    access to Redis can write, or from a job queued before the operator changed the rules."""
    try:
        parts = urlsplit(url)
        name, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme not in ("http", "https") or not name:
            raise ValueError("not an absolute http(s) URL")
        host = name if literal_address(name) is not None else check_host_name(name)  # a name as ASCII (IDNA)
    except (ValueError, FastDeployError) as exc:
        raise Refused(f"refused: the URL is not usable ({exc})") from None
    if allowed_hosts and not listed_host(name, allowed_hosts):
        raise Refused(f"refused: {host} is not one of the --webhook-hosts")
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    deny_private = not private_allowed(name, allowed_hosts, allow_private)
    for address in addresses:
        refusal = address_refusal(address, deny_private)
        if refusal:
            why = "" if address_refusal(address, False) else " (allow with --webhook-allow-private or --webhook-hosts)"
            raise Refused(f"refused: {host} resolves to {refusal}{why}")
    return _targets_for(url, host, port, addresses)


class WebhookSender:
    """Polls the outbox and POSTs due webhooks concurrently."""

    def __init__(self, settings: Settings, store: Store, call: StoreCall) -> None:
        self.settings = settings
        self.store = store
        self._call = call
        self._client: Optional[httpx.AsyncClient] = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()  # failed attempts waiting out their time
        self._outage = False
        self._signer = Webhook(webhook_signing_key(settings.webhook_secret)) if settings.webhook_secret else None

    async def run(self) -> None:
        """Deliver until cancelled."""
        self._client = httpx.AsyncClient(  # no kept-alive connections: each is verified for one delivery's host
            timeout=self.settings.webhook_timeout, follow_redirects=False, limits=httpx.Limits(max_keepalive_connections=0)
        )
        try:
            await keep_running("the webhook sender", self._tick)
        finally:
            for task in [*self._tasks, *self._settling]:
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
        await self._record(self.store.webhook_delivered, job_id)

    async def _record(self, step: Callable[..., None], job_id: str, *args: Any) -> None:
        """Write a delivery's state; if the store is down the lease runs out and it is tried once
        more (webhooks are delivered at least once)."""
        try:
            await self._call(step, job_id, *args)
        except FastDeployError as exc:
            log.warning("could not record the webhook state of %s: %s", job_id, exc.reason)

    async def _post(self, target: Target, body: bytes, headers: dict[str, str]) -> int:
        """POST and return the status; the reply's body is never read (a receiver may answer with gigabytes)."""
        assert self._client is not None
        extensions = {"sni_hostname": target.tls_host} if target.tls_host else {}
        async with self._client.stream(
            "POST", target.url, content=body, headers={**headers, "Host": target.host_header}, extensions=extensions
        ) as response:
            return response.status_code

    async def _attempt(self, delivery: WebhookDelivery) -> str:
        """One try: "" once delivered, else what went wrong; Refused when it must not be sent to these addresses."""
        s = self.settings
        targets = await resolve_targets(delivery.url, s.allowed_webhook_hosts, s.webhook_allow_private)
        headers = {"Content-Type": "application/json"}
        if self._signer is not None:
            headers.update(signature_headers(self._signer, delivery.job_id, delivery.body, time.time()))
        for target in targets[:-1]:
            try:
                return _outcome(await self._post(target, delivery.body, headers))
            except (httpx.ConnectError, httpx.ConnectTimeout):
                continue  # as browsers do: the next address the name resolves to
        return _outcome(await self._post(targets[-1], delivery.body, headers))

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        """One attempt; a failure is recorded when the attempt's time runs out (see ``_fail_at``)."""
        started = time.monotonic()
        error = await self._try(delivery)
        if not error:
            await self._delivered(delivery.job_id)
            return
        task = asyncio.create_task(self._fail_at(delivery, error, started + self.settings.webhook_timeout))
        self._settling.add(task)  # off the CONCURRENCY slots: waiting costs a timer, not a delivery
        task.add_done_callback(self._settling.discard)

    async def _fail_at(self, delivery: WebhookDelivery, error: str, due: float) -> None:
        """Record a failed attempt at ``due`` (its start + --webhook-timeout), not when it failed: a
        closed port fails at once and a silent one at the timeout, and a client that reads /result
        (``attempts``, ``last_attempt_at``, when the retries come) must not tell them apart. Within
        the outbox lease (--webhook-timeout + 5 s), so no other sender takes the delivery meanwhile."""
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        await self._failed(delivery, error)

    async def _try(self, delivery: WebhookDelivery) -> str:
        """One try under one deadline: "" once delivered, else why not (for the log only)."""
        timeout = self.settings.webhook_timeout
        try:  # one deadline for the whole try: within the outbox lease, whatever the receiver trickles
            error = await asyncio.wait_for(self._attempt(delivery), timeout)
        except Refused as exc:  # retried like any failure: the attempts a client sees do not tell it apart
            error = str(exc)
        except asyncio.TimeoutError:
            error = f"no answer within {timeout:g} s"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = f"could not connect: {type(exc).__name__}: {exc}"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:  # the receiver's fault, or its URL's
            error = f"{type(exc).__name__}: {exc}"
        return error

    async def _failed(self, delivery: WebhookDelivery, error: str) -> None:
        """Schedule the next try with a growing delay, or give up after --webhook-attempts. The
        error is logged only: the store, which /result reads, learns that the attempt failed."""
        attempts, where, about = delivery.attempts + 1, loggable_url(delivery.url), about_job(delivery.job_id)
        try:
            if attempts >= self.settings.webhook_attempts:
                log.warning("webhook for %s to %s abandoned after %d attempts: %s",
                            delivery.job_id, where, attempts, error, extra=about)
                await self._record(self.store.webhook_failed, delivery.job_id)
            else:
                delay = next_delay(self.settings, delivery.attempts)
                log.info("webhook for %s to %s failed (%s); retry %d in %.1f s",
                         delivery.job_id, where, error, attempts, delay, extra=about)
                await self._record(self.store.webhook_retry, delivery.job_id, time.time() + delay)
        except FastDeployError as exc:  # the lease runs out and another try happens later
            log.warning("could not record webhook attempt for %s: %s", delivery.job_id, exc.reason)


def _outcome(status: int) -> str:
    return "" if 200 <= status < 300 else f"HTTP {status}"
