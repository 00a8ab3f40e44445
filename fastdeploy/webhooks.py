"""Webhook delivery from the store's outbox: retried with growing delays, never raising.

Each API server runs one sender. Deliveries are leased from the store, so with several
servers each webhook is POSTed by one of them at a time; a receiver that never answers
only occupies one of a bounded number of concurrent slots, for at most --webhook-timeout.

What a delivery trusts and is trusted with:
- signed per the Standard Webhooks specification when --webhook-secret is set
  (``webhook-id`` = ``msg_<job id>`` on every retry, ``webhook-timestamp`` per attempt);
- the host is resolved once, every address it resolves to is checked (link-local and
  metadata addresses always refused, loopback and private ones with
  --webhook-deny-private), and the connection goes to a checked address, so a second
  DNS answer cannot swap it; redirects are not followed;
- only the status line and headers of the reply are read: a huge reply costs nothing.
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
from fastdeploy.payloads import IPAddress, address_refusal, check_host_name, literal_address
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
    """A webhook that must not be sent: its URL is unusable or its host resolves to a forbidden address."""


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


async def resolve_targets(url: str, deny_private: bool) -> list[Target]:
    """Resolve the host once and check every address; Refused if any is forbidden (DNS cannot pick one later)."""
    try:
        parts = urlsplit(url)
        name, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme not in ("http", "https") or not name:
            raise ValueError("not an absolute http(s) URL")
        host = name if literal_address(name) is not None else check_host_name(name)  # a name as ASCII (IDNA)
    except (ValueError, FastDeployError) as exc:
        raise Refused(f"refused: the URL is not usable ({exc})") from None
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    for address in addresses:
        refusal = address_refusal(address, deny_private)
        if refusal:
            why = " (--webhook-deny-private)" if not address_refusal(address, False) else ""
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
        """One try: "" once delivered, else what went wrong; Refused when it must not be sent at all."""
        targets = await resolve_targets(delivery.url, self.settings.webhook_deny_private)
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
        timeout = self.settings.webhook_timeout
        try:  # one deadline for the whole try: within the outbox lease, whatever the receiver trickles
            error = await asyncio.wait_for(self._attempt(delivery), timeout)
        except Refused as exc:  # final: a retry would be refused the same way
            log.warning("webhook for %s to %s abandoned without retrying: %s",
                        delivery.job_id, loggable_url(delivery.url), exc)
            await self._record(self.store.webhook_failed, delivery.job_id, REFUSED_FOR_CLIENTS)
            return
        except asyncio.TimeoutError:
            error = f"no answer within {timeout:g} s"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = f"{CONNECT_FAILED}: {type(exc).__name__}: {exc}"
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:  # the receiver's fault, or its URL's
            error = f"{type(exc).__name__}: {exc}"
        if error:
            await self._failed(delivery, error)
        else:
            await self._delivered(delivery.job_id)

    async def _failed(self, delivery: WebhookDelivery, error: str) -> None:
        """Schedule the next try with a growing delay, or give up after --webhook-attempts."""
        attempts = delivery.attempts + 1
        try:
            if attempts >= self.settings.webhook_attempts:
                log.warning("webhook for %s to %s abandoned after %d attempts: %s",
                            delivery.job_id, loggable_url(delivery.url), attempts, error)
                await self._record(self.store.webhook_failed, delivery.job_id, for_clients(error))
            else:
                delay = next_delay(self.settings, delivery.attempts)
                log.info("webhook for %s failed (%s); retry %d in %.1f s", delivery.job_id, error, attempts, delay)
                await self._record(self.store.webhook_retry, delivery.job_id, time.time() + delay, for_clients(error))
        except FastDeployError as exc:  # the lease runs out and another try happens later
            log.warning("could not record webhook attempt for %s: %s", delivery.job_id, exc.reason)


REFUSED_FOR_CLIENTS = "refused: the webhook's host is not one webhooks may reach"
CONNECT_FAILED = "could not connect"


def for_clients(error: str) -> str:
    """What /result may tell of a failed attempt: its kind, never the details (which addresses
    answer, how an internal service replies): those stay in the server log."""
    if error.startswith("HTTP "):
        return f"HTTP {error[5:6]}xx"
    if error.startswith("no answer within"):
        return "no answer in time"
    if error.startswith(CONNECT_FAILED):
        return CONNECT_FAILED
    return "the delivery failed"


def _outcome(status: int) -> str:
    return "" if 200 <= status < 300 else f"HTTP {status}"
