"""The state folder: created with a ``.gitignore`` of its own, so jobs, uploads and the store
secret never reach git (the default folder, RECIPE/.fastdeploy, sits inside the recipe).

It serves one service at a time. A supervisor holds an OS lock (flock) on ``in-use.lock`` in it
for its whole life, which the kernel releases when the process dies, kill -9 included, so a
stale lock never blocks a restart. ``run`` holds it alone; ``serve`` and ``worker``, the two
halves of one service, share it (and workers share ``loops.lock``, which tells the first of them
that the loops recorded before it are gone). A small JSON note per holder (``in-use/<pid>.json``:
command, pid, host, ports) lets the command that is refused name who holds the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from fastdeploy.errors import FastDeployError

log = logging.getLogger(__name__)

LOCK_FILE = "in-use.lock"  # flock'ed for the life of each supervisor using the folder
LOOPS_LOCK_FILE = "loops.lock"  # shared by the workers of the folder, for the life of each
LOOPS_PROBE_FILE = "loops-probe.lock"  # held alone by a worker for the moment it looks at loops.lock
NOTES = "in-use"  # one JSON note per holder: who it is, for the message that refuses another


def create_state_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents); only a folder created here gets the ``.gitignore``:
    one that exists already (``--state-dir`` may name a folder of the user's) is left as it is.
    Raises OSError when it cannot be created."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder.mkdir()
    except FileExistsError:
        return
    (folder / ".gitignore").write_text("*\n")  # everything in it, this file included


@dataclass(frozen=True)
class Holder:
    """Who uses a state folder: the command, its supervisor's pid and host, and its HTTP port(s)."""

    command: str
    pid: int
    host: str
    ports: tuple[int, ...] = ()

    def describe(self) -> str:
        ports = f", port {', '.join(map(str, self.ports))}" if self.ports else ""
        return f"`fastdeploy {self.command}` (pid {self.pid} on host {self.host}{ports})"


class FolderInUse(FastDeployError):
    """Another fastDeploy service uses this state folder: this command stops before touching its jobs."""


class FolderLock:
    """A supervisor's hold on its state folder. ``alone``: no other process running prediction loops
    held it when it was taken (then the loops recorded there before are gone: their jobs may be
    requeued at once)."""

    def __init__(self, folder: Path, fds: list[int], alone: bool) -> None:
        self.folder = folder
        self.alone = alone
        self._fds = fds
        self._note = folder / NOTES / f"{os.getpid()}.json"

    def announce(self, command: str, ports: tuple[int, ...]) -> None:
        """Write who holds the folder, for the message that refuses the next one (best effort)."""
        holder = Holder(command, os.getpid(), socket.gethostname(), ports)
        temporary = self._note.with_suffix(".tmp")
        try:
            self._note.parent.mkdir(exist_ok=True)
            temporary.write_text(json.dumps(dataclasses.asdict(holder)))
            os.replace(temporary, self._note)
        except OSError as exc:  # a full disk: the lock holds all the same; a refusal will say less
            log.warning("could not note who uses %s: %s", self.folder, exc.strerror)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self._note.unlink()
        for fd in self._fds:
            os.close(fd)


def hold(folder: Path, command: str) -> FolderLock:
    """Take ``folder`` for ``command`` (run, serve or worker), or raise FolderInUse naming who has it.

    ``run`` locks ``in-use.lock`` exclusively; ``serve`` and ``worker`` only ever share it (never
    exclusive, not even for a moment, so a serve and a worker started together both get in). Whether
    a worker is the only process with loops there is told by a second lock that loop runners share."""
    create_state_folder(folder)
    fds = [_open(folder / LOCK_FILE)]
    try:
        if command == "run":
            _take(fds[0], fcntl.LOCK_EX, folder, command)
            _forget_notes(folder)  # whoever wrote them is gone: a live holder would hold the lock
            return FolderLock(folder, fds, alone=True)
        _take(fds[0], fcntl.LOCK_SH, folder, command)
        if command != "worker":
            return FolderLock(folder, fds, alone=False)
        fds.append(_open(folder / LOOPS_LOCK_FILE))
        return FolderLock(folder, fds, alone=_first_loops(folder, fds[1]))
    except FolderInUse:
        for fd in fds:
            os.close(fd)
        raise


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _take(fd: int, kind: int, folder: Path, command: str) -> None:
    """Lock, or raise FolderInUse; a file system without locks (some network ones) enforces nothing."""
    try:
        if _try_lock(fd, kind):
            return
    except OSError as exc:
        log.warning("cannot lock the state folder %s (%s): a second fastDeploy on it would go unnoticed",
                    folder, exc.strerror)
        return
    raise FolderInUse(_refusal(folder, command))


def _first_loops(folder: Path, fd: int) -> bool:
    """Whether no other worker holds the loop runners' lock; then share it for good.

    The look (take it alone, then turn that into a share) is two steps for flock, with no lock held
    in between: two workers starting together could each look in the other's gap and both count as
    alone (each requeueing the other's jobs). So workers look one at a time, under a probe lock."""
    probe = _open(folder / LOOPS_PROBE_FILE)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX)  # waits only for another worker's own look, a moment
        alone = _try_lock(fd, fcntl.LOCK_EX)
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:  # no locks here: as before there were any, the earlier loops count as gone
        return True
    finally:
        os.close(probe)  # lets the next worker look
    return alone


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _forget_notes(folder: Path) -> None:
    for note in (folder / NOTES).glob("*"):
        with contextlib.suppress(OSError):
            note.unlink()


def _holders(folder: Path) -> list[Holder]:
    """The holders' notes, but those of processes on this host that are gone (killed serve or worker)."""
    holders: list[Holder] = []
    for note in sorted((folder / NOTES).glob("*.json")):
        try:
            about = json.loads(note.read_text())
            holder = Holder(str(about["command"]), int(about["pid"]), str(about["host"]),
                            tuple(int(p) for p in about["ports"]))
        except (OSError, ValueError, KeyError, TypeError):  # half written, or not ours: it names nobody
            continue
        if holder.host != socket.gethostname() or _alive(holder.pid):
            holders.append(holder)
    return holders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _refusal(folder: Path, command: str) -> str:
    """Why ``command`` stops, naming who holds the folder, and what to do instead."""
    holders = _holders(folder)
    who = " and ".join(h.describe() for h in holders) or "another fastDeploy (it has not said which yet)"
    them = "it" if len(holders) < 2 else "them"
    if command == "run":
        how = (f"one state folder serves one `fastdeploy run` at a time. Stop {them} first; to run a second copy "
               "with a queue of its own, give it its own --state-dir (e.g. --state-dir /tmp/second-copy); to share "
               "one queue between copies on purpose, start every copy with --broker redis://HOST:6379/0")
    else:
        how = (f"a `fastdeploy run` keeps its state folder to itself (it runs API servers and prediction loops "
               f"already). Stop it to split the service into `serve` and `worker`; to run this {command} for a "
               "service of its own, give it its own --state-dir; to share one queue on purpose, start every "
               "process with --broker redis://HOST:6379/0")
    return f"the state folder {folder} is in use by {who}: {how}"
