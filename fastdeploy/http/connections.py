"""Connection limits for the API server processes, which uvicorn (0.54) does not have.

uvicorn times out only idle keep-alive connections: a connection that never sends a request,
or sends its head a byte at a time, stays open for good, and each holds a file descriptor,
so a few thousand such sockets starve the process of descriptors and every request fails
(issue #12). The protocol classes here close a connection whose request head has not
arrived within ``--header-timeout``, answer a connection beyond ``--max-connections`` with
503 at once, and ``raise_open_file_limit`` gives the process every descriptor it may have.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Protocol, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from fastdeploy import bodies, logs

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools missing (it comes with uvicorn[standard]): uvicorn's h11 parser is used
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

REFUSAL_LINGER_SECONDS = 1.0  # a refused connection is closed this long after its 503, or at its EOF
REFUSAL_LOG_SECONDS = 10.0  # at most one warning about refused connections per this many seconds
RESERVED_DESCRIPTORS = 100  # descriptors a process needs beside its connections (store, doorbell, logs)


class Limits(NamedTuple):
    """What one API server process allows a connection."""

    header_timeout: float  # seconds to send a complete request head
    max_connections: int  # open connections per process; 0 = no cap


class _Cycle(Protocol):
    """The part of uvicorn's request-response cycle (either parser's) a late head looks at."""

    response_complete: bool
    keep_alive: bool


class _RefusalLog:
    """Warns about refused connections at most once per ``REFUSAL_LOG_SECONDS``, with a count,
    so a flood of connections cannot flood the log too."""

    def __init__(self) -> None:
        self.count = 0
        self.last = float("-inf")

    def refused(self, limit: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= REFUSAL_LOG_SECONDS:
            log.warning("refused %d connection(s) with 503 since the last warning: this API server process already "
                        "has %d open connections (--max-connections)", self.count, limit)
            self.count, self.last = 0, now


_REFUSALS = _RefusalLog()


def refusal_response(limit: int, request_id: str) -> bytes:
    """The whole HTTP answer a connection over the cap gets before it is closed."""
    body = bodies.failure(f"too many open connections: this server process already has {limit} "
                          "(--max-connections); retry shortly")
    return _closing_response(b"503 Service Unavailable", body, request_id, b"retry-after: 1\r\n")


def _closing_response(status: bytes, body: bytes, request_id: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer written by this module itself (no request reached the app), with the
    ``X-Request-ID`` every answer carries, after which the connection closes."""
    head = (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%sx-request-id: %s\r\n"
            b"connection: close\r\n\r\n" % (status, len(body), extra, request_id.encode("ascii")))
    return head + body


class _Refusal(asyncio.Protocol):
    """Takes over a connection beyond the cap: answers 503 at once, drops whatever the client sends,
    and closes at the client's EOF or after a moment (closing at once could reset the answer away)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._closer: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        request_id = logs.new_request_id()
        log.debug("refused a connection with 503 (--max-connections %d)", self._limit,
                  extra={"request_id": request_id})
        stream.write(refusal_response(self._limit, request_id))
        if stream.can_write_eof():
            stream.write_eof()
        self._closer = self._loop.call_later(REFUSAL_LINGER_SECONDS, stream.close)

    def data_received(self, data: bytes) -> None:
        """The refused request is read and dropped, so closing does not reset the answer away."""

    def eof_received(self) -> None:
        """Returning nothing lets asyncio close the transport: the client has read its answer."""

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._closer is not None:
            self._closer.cancel()


def _refuse_if_full(open_now: int, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                    limits: Limits) -> bool:
    """Hand a connection beyond the cap to ``_Refusal``; True when it was refused."""
    if not limits.max_connections or open_now < limits.max_connections:
        return False
    _REFUSALS.refused(limits.max_connections)
    refusal = _Refusal(loop, limits.max_connections)
    transport.set_protocol(refusal)
    refusal.connection_made(transport)
    return True


class _HeadDeadline:
    """One connection's deadline for a complete request head; armed only while one is awaited."""

    __slots__ = ("_loop", "_seconds", "_expire", "_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, expire: Callable[[], None]) -> None:
        self._loop = loop
        self._seconds = seconds
        self._expire = expire
        self._handle: Optional[asyncio.TimerHandle] = None

    def arm(self) -> None:
        """Start the clock unless it runs already: more bytes of the same head do not reset it."""
        if self._handle is None:
            self._handle = self._loop.call_later(self._seconds, self._fire)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._expire()


def _head_late(transport: asyncio.Transport, cycle: Optional[_Cycle], seconds: float) -> None:
    """A request head is late: close the connection, or, while an earlier request on it is
    still being answered (a pipelined head), close it right after that answer."""
    if transport.is_closing():
        return
    if cycle is not None and not cycle.response_complete:
        cycle.keep_alive = False
        return
    log.debug("closed a connection that sent no complete request head within %g s (--header-timeout)", seconds)
    transport.close()


class _Guard(asyncio.Protocol):
    """What both guarded protocols add to uvicorn's: the connection cap, and the deadline for a
    request head (each protocol arms it for a partial head in its own way). Mixed in before
    uvicorn's protocol class, whose attributes it uses."""

    limits: ClassVar[Limits] = Limits(10.0, 0)
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    transport: asyncio.Transport
    cycle: Any  # uvicorn's RequestResponseCycle of either parser (a _Cycle), None before the first request

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = _HeadDeadline(self.loop, self.limits.header_timeout, self._head_late)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not _refuse_if_full(len(self.connections), self.loop, transport, self.limits):
            super().connection_made(transport)
            self._deadline.arm()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._deadline.disarm()
        super().connection_lost(exc)

    def _head_late(self) -> None:
        _head_late(self.transport, self.cycle, self.limits.header_timeout)

    def send_400_response(self, msg: str) -> None:
        """A request the HTTP parser refuses (uvicorn's own 400): the one error shape, with a request id."""
        request_id = logs.new_request_id()
        log.info("answered 400 to a request the HTTP parser refused: %s", msg, extra={"request_id": request_id})
        body = bodies.failure(f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); check the client")
        self.transport.write(_closing_response(b"400 Bad Request", body, request_id))
        self.transport.close()


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with a deadline for request heads and a cap on connections."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # bytes of a head, not all of it yet
            self._deadline.arm()
        else:
            self._deadline.disarm()


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with a deadline for request heads and a cap on connections.
        A head that arrives in one piece (nearly every request) never starts a timer."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_pending = False

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_pending:
                self._deadline.arm()

        def on_message_begin(self) -> None:
            self._head_pending = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._head_pending = False
            self._deadline.disarm()
            super().on_headers_complete()


def protocol_class(limits: Limits, parser: str = "auto") -> type[asyncio.Protocol]:
    """The HTTP protocol class for uvicorn's ``Config(http=...)`` with these limits: httptools
    (uvicorn's fast parser) when installed and ``parser`` is "auto", else h11."""
    use_httptools = parser in ("auto", "httptools") and HttpToolsProtocol is not None
    base: type[asyncio.Protocol] = GuardedHttpToolsProtocol if use_httptools else GuardedH11Protocol
    return cast("type[asyncio.Protocol]", type(base.__name__, (base,), {"limits": limits}))


def raise_open_file_limit(max_connections: int) -> int:
    """Raise this process's soft open-file limit to its hard limit (every connection holds a
    descriptor, and 1,024 is a common soft default), and warn when even that is too few for
    ``max_connections``; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.debug("open-file limit raised from %d to %d", soft, hard)
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. macOS refuses RLIM_INFINITY for files
            log.debug("open-file limit stays %d (hard %d): %s", soft, hard, exc)
    if max_connections and soft != resource.RLIM_INFINITY and max_connections > soft - RESERVED_DESCRIPTORS:
        log.warning("--max-connections %d is more than the open-file limit (%d) leaves room for: connections "
                    "beyond about %d will fail instead of getting 503; lower --max-connections or raise the "
                    "hard limit (ulimit -Hn)", max_connections, soft, max(0, soft - RESERVED_DESCRIPTORS))
    return soft
