"""The embedded store's doorbell: Unix datagram sockets in one folder, on one host.

A reader binds ``<role>-<pid>-<n>.sock`` (role ``stage<N>`` for loops, ``api`` for API
servers); a writer (the SQLite store, after it commits) sends a datagram to every socket
of a role, or to one reader by its name (its address). Rings are hints: a full buffer or
a dead reader drops the ring, and readers fall back to a short poll. One datagram is one
message: senders keep each under ``MAX_DATAGRAM`` bytes.

This is also the one place that decides when to look for a ring without sleeping
(``LoneRhythm``): a process that sleeps until a ring wakes it pays for the wake-up; on a
virtual machine whose idle cores halt that is tens of microseconds per hop, and one
/sync request makes two hops (API server -> loop -> API server). While one client sends
request after request, the next ring comes within a fraction of a millisecond, so
polling for it for a bounded while (``spin_seconds``) is cheaper than sleeping. Under
load nobody sleeps anyway, and polling would only take cores from the processes doing
the work: so polling is allowed only after a streak of lone, prompt arrivals.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import logging
import os
import select
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import msgpack

from fastdeploy.jobs import ResultNews
from fastdeploy.store.doorbell import Deliver, Doorbell
from fastdeploy.store.news import read_news

log = logging.getLogger(__name__)

T = TypeVar("T")

_LISTENERS = itertools.count()
_MAX_PATH = 100  # sun_path is 108 bytes on Linux
_REFRESH_SECONDS = 0.5
MAX_DATAGRAM = 60_000
API_ROLE = "api"
STREAK = 8  # lone, prompt arrivals in a row before polling starts
POLL_SLICE_SECONDS = 0.0001  # an API server polls this long at a time between event-loop turns


def stage_role(stage: int) -> str:
    return f"stage{stage}"


def bell_folder(state_dir: Path) -> Path:
    """A folder for the sockets, short enough for sun_path (a temp folder when the state path is deep)."""
    folder = state_dir / "bells"
    if len(str(folder)) + 40 > _MAX_PATH:
        digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"fastdeploy-bells-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Bells:
    """The sending half: rings every reader of a role, or one reader by name."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._targets: dict[str, tuple[float, list[str]]] = {}
        self._paths: dict[str, str] = {}  # reader name -> socket path

    def _readers(self, role: str) -> list[str]:
        now = time.monotonic()
        cached = self._targets.get(role)
        if cached is not None and now - cached[0] < _REFRESH_SECONDS:
            return cached[1]
        prefix = role + "-"
        try:
            names = [str(self._folder / n) for n in os.listdir(self._folder) if n.startswith(prefix) and n.endswith(".sock")]
        except OSError:  # the folder is gone or unreadable: nobody to ring, the readers poll
            names = []
        self._targets[role] = (now, names)
        return names

    def ring(self, role: str, messages: Sequence[bytes] = (b"",)) -> None:
        """Send each message, as one datagram, to every reader of ``role``."""
        for path in self._readers(role):
            for message in messages:
                try:
                    self._sender.sendto(message, path)
                except OSError as exc:
                    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                        self._forget(role, path)
                    break  # EAGAIN (reader busy) and the rest: the reader's poll covers it

    def ring_reader(self, name: str, messages: Sequence[bytes]) -> None:
        """Send each message to the one reader called ``name`` (a ``LocalDoorbell.address``)."""
        path = self._paths.get(name)
        if path is None:
            if "/" in name or not name.endswith(".sock"):
                return  # not a reader's name: nothing to ring
            if len(self._paths) > 1000:  # readers come and go with restarts
                self._paths.clear()
            path = self._paths[name] = str(self._folder / name)
        for message in messages:
            try:
                self._sender.sendto(message, path)
            except OSError:
                return  # gone, or its buffer is full: its poll covers it

    def _forget(self, role: str, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
        self._targets.pop(role, None)

    def close(self) -> None:
        self._sender.close()


class LoneRhythm:
    """Counts lone arrivals that came within the budget; says how long to poll before sleeping."""

    def __init__(self, budget_seconds: float, streak: int = STREAK) -> None:
        self.budget = max(0.0, budget_seconds)
        self._needed = streak
        self._streak = 0

    def observe(self, lone: bool, gap_seconds: float) -> None:
        """Record one arrival: whether nothing else was in flight, and how long it was waited for."""
        if lone and gap_seconds <= self.budget:
            self._streak = min(self._streak + 1, self._needed)
        else:
            self._streak = 0

    def spin_seconds(self) -> float:
        """How long to poll before sleeping: the budget while in rhythm, else 0."""
        return self.budget if self.budget > 0 and self._streak >= self._needed else 0.0


class LocalDoorbell(Doorbell):
    """The receiving half for one process: one socket, of the role it listens as."""

    def __init__(self, folder: Path, spin_seconds: float = 0.0) -> None:
        super().__init__()
        self._folder = folder
        self._receiver: Optional[socket.socket] = None
        self._own_path: Optional[Path] = None
        self._jobs_rhythm = LoneRhythm(spin_seconds)  # a loop: jobs arriving one at a time
        self._answer_rhythm = LoneRhythm(spin_seconds)  # an API server: lone /sync answers
        self._woke_alone = False  # the last idle wait ended with one prompt ring
        self._watched: Optional[tuple[asyncio.AbstractEventLoop, Deliver]] = None

    # -- the socket -----------------------------------------------------------
    def _listen(self, role: str) -> None:
        """Bind this process's socket; without one (folder unusable) waits become plain sleeps."""
        # pid and a per-process count: a process may hold several doorbells (tests, tools)
        path = self._folder / f"{role}-{os.getpid()}-{next(_LISTENERS)}.sock"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if path.exists():
                path.unlink()
            receiver.bind(str(path))
            receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        except OSError as exc:
            receiver.close()
            log.warning("cannot listen for rings at %s (polling instead): %s", path, exc)
            return
        receiver.setblocking(False)
        self._receiver, self._own_path = receiver, path

    @property
    def address(self) -> Optional[str]:
        """This reader's name, by which the store rings it alone (None before listening)."""
        return self._own_path.name if self._own_path is not None else None

    def _receive(self, timeout: float, spin: float = 0.0) -> list[bytes]:
        """Every message waiting after up to ``spin`` seconds of polling, then up to ``timeout`` of sleep."""
        if self._receiver is None:
            time.sleep(max(timeout, 0.0))
            return []
        if spin > 0:
            started = time.perf_counter()
            found = self._poll(min(spin, timeout))
            self.stats["spin_seconds"] += time.perf_counter() - started
            if found:
                return self._drain()
        ready, _, _ = select.select([self._receiver], [], [], max(timeout, 0.0))
        return self._drain() if ready else []

    def _poll(self, seconds: float) -> bool:
        """Whether a ring is waiting, looking for up to ``seconds`` without sleeping (yielding the core)."""
        if self._receiver is None:
            return False
        until = time.perf_counter() + seconds
        fd = [self._receiver]
        while True:
            if select.select(fd, [], [], 0)[0]:
                return True
            if time.perf_counter() >= until:
                return False
            os.sched_yield()

    def _drain(self) -> list[bytes]:
        assert self._receiver is not None
        messages: list[bytes] = []
        while True:
            try:
                messages.append(self._receiver.recv(MAX_DATAGRAM + 1024))
            except BlockingIOError:
                return messages

    # -- loop side ------------------------------------------------------------
    def listen_for_jobs(self, stage: int) -> None:
        self._listen(stage_role(stage))

    def wait_for_jobs(self, stage: int, timeout: float) -> None:
        started = time.perf_counter()
        messages = self._receive(timeout, self._jobs_rhythm.spin_seconds())
        self._woke_alone = len(messages) == 1 and time.perf_counter() - started <= self._jobs_rhythm.budget

    def wait_for_more_jobs(self, stage: int, timeout: float) -> None:
        self._jobs_rhythm.observe(False, 0.0)  # a loop filling a batch is under load: no polling
        self._receive(timeout)

    def jobs_claimed(self, count: int) -> bool:
        self._jobs_rhythm.observe(self._woke_alone and count == 1, 0.0)
        self._woke_alone = False
        return self._jobs_rhythm.spin_seconds() == 0.0  # in a lone client's rhythm, nothing more comes

    # -- API side -------------------------------------------------------------
    def listen_for_results(self) -> None:
        self._listen(API_ROLE)

    def wait_for_results(self, timeout: float) -> list[ResultNews]:
        return _news(self._receive(timeout))

    def watch_results(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        """The event loop watches the socket itself: news is delivered without a thread hop."""
        if self._receiver is None:
            return
        self._watched = (loop, deliver)
        loop.add_reader(self._receiver.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        news = _news(self._drain()) if self._receiver is not None else []
        if news and self._watched is not None:
            self._watched[1](news)

    def stop_watching(self) -> None:
        if self._watched is not None and self._receiver is not None:
            self._watched[0].remove_reader(self._receiver.fileno())
        self._watched = None

    async def wait_for_answer(self, answer: "asyncio.Future[T]", alone: Callable[[], bool]) -> T:
        """For a lone request in a lone client's rhythm, poll for its answer first, in
        POLL_SLICE_SECONDS slices with an event-loop turn between them; once another
        request is in, stop (a crowd must not be served one request at a time)."""
        if not alone():  # under load: nothing to decide, and nothing to time
            self._answer_rhythm.observe(False, 0.0)
            return await answer
        started = time.perf_counter()
        spin = self._answer_rhythm.spin_seconds()
        if spin > 0:
            until = started + spin
            while not answer.done() and alone() and (left := until - time.perf_counter()) > 0:
                if self._poll(min(left, POLL_SLICE_SECONDS)):
                    self._on_readable()
                else:
                    await asyncio.sleep(0)
            self.stats["spin_seconds"] += time.perf_counter() - started
        result = await answer
        self._answer_rhythm.observe(alone(), time.perf_counter() - started)
        return result

    def close(self) -> None:
        self.stop_watching()
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        if self._own_path is not None:
            try:
                self._own_path.unlink()
            except OSError:
                pass
            self._own_path = None


def _news(messages: Sequence[bytes]) -> list[ResultNews]:
    heard: list[ResultNews] = []
    for message in messages:
        try:
            heard.extend(read_news(message))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:  # a mangled ring: the poll covers it
            log.warning("ignoring an unreadable result ring: %s", exc)
    return heard
