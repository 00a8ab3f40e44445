"""Doorbells between processes on one host: Unix datagram sockets in one folder.

A reader binds ``<role>-<pid>-<n>.sock``; a writer sends a datagram to every socket of that
role, or to one reader by its name. Rings are hints: a full buffer or a dead reader drops
the ring, and readers fall back to a short poll, so nothing depends on a ring arriving.
One datagram is one message: senders keep each under ``MAX_DATAGRAM`` bytes.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import select
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

_LISTENERS = itertools.count()
_MAX_PATH = 100  # sun_path is 108 bytes on Linux
_REFRESH_SECONDS = 0.5
MAX_DATAGRAM = 60_000


def bell_folder(state_dir: Path) -> Path:
    """A folder for the sockets, short enough for sun_path (a temp folder when the state path is deep)."""
    folder = state_dir / "bells"
    if len(str(folder)) + 40 > _MAX_PATH:
        digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"fastdeploy-bells-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Bell:
    """Sends rings to every reader of a role, and receives the rings of its own role."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._receiver: Optional[socket.socket] = None
        self._own_path: Optional[Path] = None
        self._targets: dict[str, tuple[float, list[str]]] = {}
        self._paths: dict[str, str] = {}  # reader name -> socket path

    def listen(self, role: str) -> None:
        # pid and a per-process count: a process may hold several stores (tests, tools)
        path = self._folder / f"{role}-{os.getpid()}-{next(_LISTENERS)}.sock"
        if path.exists():
            path.unlink()
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(path))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.setblocking(False)
        self._receiver, self._own_path = receiver, path

    def _readers(self, role: str) -> list[str]:
        now = time.monotonic()
        cached = self._targets.get(role)
        if cached is not None and now - cached[0] < _REFRESH_SECONDS:
            return cached[1]
        prefix = role + "-"
        try:
            names = [str(self._folder / n) for n in os.listdir(self._folder) if n.startswith(prefix) and n.endswith(".sock")]
        except FileNotFoundError:
            names = []
        self._targets[role] = (now, names)
        return names

    @property
    def name(self) -> Optional[str]:
        """This reader's name, by which a writer can ring it alone (None before ``listen``)."""
        return self._own_path.name if self._own_path is not None else None

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
        """Send each message to the one reader called ``name`` (a name from ``Bell.name``)."""
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

    def wait(self, timeout: float, spin: float = 0.0) -> list[bytes]:
        """Wait up to ``timeout`` for rings; return every message already waiting.

        ``spin``: first look for a ring without sleeping for up to this long (yielding
        the core to anything else runnable). A ring that is expected any moment then
        costs no wake-up of a sleeping process, which on a virtual machine whose idle
        cores halt takes tens of microseconds.
        """
        if self._receiver is None:
            time.sleep(timeout)
            return []
        if spin > 0 and self.poll(min(spin, timeout)):
            return self._drain()
        ready, _, _ = select.select([self._receiver], [], [], max(timeout, 0.0))
        return self._drain() if ready else []

    def poll(self, seconds: float) -> bool:
        """Whether a ring is waiting, looking for up to ``seconds`` without sleeping."""
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

    def fileno(self) -> Optional[int]:
        """The receiving socket, for an event loop to watch (None before ``listen``)."""
        return self._receiver.fileno() if self._receiver is not None else None

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        if self._own_path is not None:
            try:
                self._own_path.unlink()
            except OSError:
                pass
            self._own_path = None
        self._sender.close()
