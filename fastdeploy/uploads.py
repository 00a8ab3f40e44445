"""Multipart uploads streamed to disk: a FILE recipe's files the way people send them, of any size.

The HTTP layer hands ``receive_upload`` the ASGI receive stream. Parts are parsed as they
arrive (python-multipart) and each file part goes into a file of its own in a private
incoming folder, so no file is ever held whole in memory; the size limits are checked on
every chunk (413 as soon as one is passed) and a refused, broken or abandoned upload deletes
its folder at once. No file-system call runs on the event loop: the parser's callbacks only
record what to do, and a few threads of the process's own (``_disk``) do it, a batch at a
time per upload (``_Files``), so a slow ``--files-dir`` slows its uploads, never /health or
the other requests of the process. A complete upload is renamed (no copy) to
``<files root>/<job id>/`` and the job carries only references to it; the loop hands the
predictor those paths and deletes the folder once the job's outcome is recorded.
``sweep`` removes what a loop never saw: folders of jobs that ended otherwise (cancelled,
timed out, refused) and uploads a killed API server left half-way. Each API server process
receives uploads in a folder of its own under ``.incoming``, whose owner file it holds locked
(flock) for life: on its host, the kernel drops that lock when the process dies (kill -9 too),
so the next sweep there, at start-up or every few seconds, proves the folder orphaned and
removes it; other hosts sharing ``--files-dir`` remove it once its owner file, renewed by every
sweep of its process, is ABANDONED_SECONDS old.

Where no folder is shared with the workers (``--broker`` without ``--files-dir``) the
files are streamed to a private temporary folder all the same, then read into the job
itself and travel through the store like base64 files do (bounded by ``--max-body-mb``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any, AsyncContextManager, AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping, Optional, Sequence,
    TypeVar, Union,
)

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from fastdeploy.errors import BadRequest, FastDeployError, JobExists, PayloadTooLarge, Unavailable
from fastdeploy.jobs import is_job_id, new_job_id
from fastdeploy.payloads import (
    FORM_OPTIONS, MAX_UPLOAD_FILES, UPLOAD_MARKER, ParsedRequest, check_form_field, form_options, safe_file_name,
)
from fastdeploy.settings import Settings

log = logging.getLogger(__name__)

OPTION_FIELDS = FORM_OPTIONS  # text parts read as options; every other part is a file (payloads.check_form_field)
MAX_FIELD_BYTES = 4096  # an option's value (a webhook URL is at most 2048 characters)
INCOMING = ".incoming"  # under the files root; job folders never start with "."
MARKER = UPLOAD_MARKER
SWEEP_GRACE_SECONDS = 60.0  # a job folder younger than this may belong to a submit in progress
MAX_FILES = MAX_UPLOAD_FILES
IDLE_SECONDS = 60.0  # an upload that sends nothing for this long is answered 408 and its files deleted
# an incoming folder whose process showed no life (or, in the layout before owners, an upload that wrote
# nothing) for this long belongs to no live upload: every live one is answered 408 within IDLE_SECONDS
ABANDONED_SECONDS = 3 * IDLE_SECONDS
OWNER_FILE = ".fastdeploy-owner"  # in an API server process's incoming folder: locked while it lives
_IDLE_STEP = 0.25  # the idle deadline is pushed back once per this share of it, not on every chunk
# an upload's bytes wait in memory until this many (or LINGER_SECONDS) before a disk thread writes them,
# and as many more while it does: a small upload is written in one go, together with its settling
FLUSH_BYTES = 1024 * 1024
LINGER_SECONDS = 0.05  # what arrived waits at most this long for more (a slow client, or one stopping half-way)
DISK_THREADS = 4  # per API server process: the uploads in progress share them, one batch at a time each
_IOV_MAX = 1024  # buffers per writev: IOV_MAX on Linux and macOS
_UPLOAD_KEY = "upload"  # an input {"upload": <folder>}: the file is in that job folder, not in the payload
_FOLDER = re.compile(r"[A-Za-z0-9._:%-]+")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


class UploadAbandoned(FastDeployError):
    """The client closed the connection before its upload was complete (answered to nobody)."""

    status = 499


class UploadStalled(FastDeployError):
    """The client sent nothing for IDLE_SECONDS in the middle of its upload."""

    status = 408


def files_root(settings: Settings) -> Optional[Path]:
    """Where uploads wait for their job: ``--files-dir``, else the embedded store's state folder;
    None where no folder is shared with the workers (Redis without ``--files-dir``)."""
    if settings.files_dir:
        return Path(settings.files_dir)
    return None if settings.broker else settings.state_path / "files"


def folder_name(job_id: str) -> str:
    """A job's folder: its id, with a leading "." written %2E (ids may be "." or ".."; % is never in one)."""
    return "%2E" + job_id[1:] if job_id.startswith(".") else job_id


def job_id_of(folder: str) -> str:
    return "." + folder[3:] if folder.startswith("%2E") else folder


def is_multipart(content_type: bytes) -> bool:
    return content_type.split(b";", 1)[0].strip().lower() == b"multipart/form-data"


T = TypeVar("T")
_Op = Union[str, memoryview, None]  # a recorded operation: open the file so named / write these bytes to it / close it


@functools.lru_cache(maxsize=1)
def _disk() -> concurrent.futures.ThreadPoolExecutor:
    """This process's threads for the file-system calls of uploads (made at its first upload): a slow
    disk holds these, never the event loop, the store's thread or the sweep's."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=DISK_THREADS, thread_name_prefix="upload-disk")


class _Files:
    """An upload's files on disk. The parser's callbacks only record what to do (``open``, ``write``,
    ``close``); a disk thread does it, one batch at a time: once FLUSH_BYTES wait (the next batch
    waits for the one before, so memory stays bounded and a slow disk slows this upload only), once
    what arrived waited LINGER_SECONDS for more, and at the end together with settling the upload.
    A small upload costs one thread hop in all."""

    def __init__(self, root: Optional[Path]) -> None:
        self.root = root
        self.folder: Optional[Path] = None  # made by the first batch written
        self.backlog = 0  # bytes recorded, not handed to a disk thread yet
        self._ops: list[_Op] = []
        self._fd: Optional[int] = None  # the file being written (used by the disk threads only)
        self._busy: Optional[concurrent.futures.Future[Any]] = None  # the batch handed to a disk thread last
        self._timer: Optional[asyncio.TimerHandle] = None

    # -- on the event loop: recording, and handing batches over ----------------------------
    def open(self, name: str) -> None:
        self._record(name, 0)

    def write(self, data: bytes, start: int, end: int) -> None:
        """Record ``data[start:end]``: a view where ``data`` cannot change (the body's own bytes), else a copy."""
        view = memoryview(data)[start:end] if isinstance(data, bytes) else memoryview(bytes(data[start:end]))
        self._record(view, end - start)

    def close(self) -> None:
        self._record(None, 0)

    def _record(self, op: _Op, size: int) -> None:
        self._ops.append(op)
        self.backlog += size
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._linger)

    def check(self) -> None:
        """Raise what went wrong in a batch written meanwhile (a full disk: 503) at the next chunk."""
        if self._busy is not None and self._busy.done():
            self._busy.result()
            self._busy = None

    async def flush(self) -> None:
        """Hand what is recorded to a disk thread, once the batch before it is written."""
        await self._drain()
        self._start()

    async def finish(self, then: Callable[[], T]) -> T:
        """Write what is left, then ``then()``, in one batch: the only thread hop of a small upload."""
        await self._drain()
        self._start(then)
        result: T = await self._drain()
        return result

    async def discard(self) -> None:
        """Drop what is recorded and delete what was written, once no disk thread works on it any more."""
        self._stop_timer()
        self._ops, self.backlog = [], 0
        busy, self._busy = self._busy, None
        if busy is not None and not busy.done():
            await asyncio.wait([asyncio.wrap_future(busy)])
        if self.folder is not None or self._fd is not None:
            await asyncio.get_running_loop().run_in_executor(_disk(), self._remove)

    def _linger(self) -> None:
        """What arrived waited long enough for more (a client sending slowly, or stopping half-way): write it."""
        self._timer = None
        if not self._ops:
            return
        busy = self._busy
        if busy is not None and not busy.done():
            self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._linger)
        elif busy is None or (not busy.cancelled() and busy.exception() is None):
            self._start()  # (one that failed is told by the next chunk, or the end)

    def _start(self, then: Optional[Callable[[], Any]] = None) -> None:
        ops, self._ops, self.backlog = self._ops, [], 0
        self._stop_timer()
        self._busy = _disk().submit(self._apply, ops, then)

    async def _drain(self) -> Any:
        """The result of the batch handed over last, once written. A cancelled request stops waiting, not
        the disk thread: the batch stays in ``_busy`` for ``discard`` to wait for."""
        busy = self._busy
        if busy is None:
            return None
        result = await asyncio.wrap_future(busy)
        self._busy = None
        return result

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- on a disk thread -----------------------------------------------------------------
    def _apply(self, ops: list[_Op], then: Optional[Callable[[], Any]]) -> Any:
        """The recorded operations in order, each run of writes in one system call; then ``then()``."""
        data: list[memoryview] = []
        for op in ops:
            if isinstance(op, memoryview):
                data.append(op)
                continue
            self._write_now(data)
            data = []
            if op is None:
                fd, self._fd = self._fd, None
                _close(fd)
            else:
                self._fd = _opened(self._made() / op)
        self._write_now(data)
        return then() if then is not None else None

    def _write_now(self, data: list[memoryview]) -> None:
        if data:
            assert self._fd is not None  # python-multipart sends a part's data after its headers only
            _write(self._fd, data)

    def _made(self) -> Path:
        if self.folder is None:
            self.folder = _incoming(self.root)
        return self.folder

    def settle_now(self, target: Path) -> None:
        """Move the files to ``target`` (a rename: no copy)."""
        folder = self._made()
        os.utime(folder)  # the sweep's grace period counts from here
        os.rename(folder, target)
        self.folder = target

    def take_now(self, names: Sequence[str]) -> list[Any]:
        """The files as ``[name, bytes]`` pairs; their folder goes."""
        folder = self._made()
        try:
            files = [[name, (folder / name).read_bytes()] for name in names]
        except OSError as exc:
            raise _unavailable(exc) from None
        self._remove()
        return files

    def _remove(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


@dataclass
class Upload:
    """A received upload: its option fields, and its files (key, name on disk), some perhaps still being written."""

    files: _Files
    fields: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Optional[Path]:
        return self.files.folder

    async def settle(self, root: Path, job_id: str) -> str:
        """Write what is left and move the files to the job's folder; 409 when that job has files already."""
        try:
            await self.files.finish(functools.partial(self.files.settle_now, root / folder_name(job_id)))
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise JobExists([job_id]) from None
            raise _unavailable(exc) from None
        return folder_name(job_id)

    async def read(self) -> list[Any]:
        """The files as ``[name, bytes]`` pairs (where they travel inside the job); their folder goes."""
        return await self.files.finish(functools.partial(self.files.take_now, list(self.names)))

    async def discard(self) -> None:
        await self.files.discard()


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    option: Optional[str] = None  # the option this part sets; None: a file
    is_file: bool = False
    size: int = 0


class _Receiver:
    """python-multipart's callbacks: each part to its file (or option), every limit checked per chunk."""

    def __init__(self, upload: Upload, max_file: int, max_total: int, max_files: int) -> None:
        self.upload = upload
        self.limits = (max_file, max_total, max_files)
        self.total = 0
        self.ended = False
        self.part = _Part()
        self._value = bytearray()
        self._stored: dict[str, str] = {}  # base name on disk -> key
        self._keys: set[str] = set()  # the keys so far (upload.keys keeps their order)

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data,
            "on_part_end": self._end, "on_end": self._finished,
        }

    def _begin(self) -> None:
        self.part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self.part.headers[bytes(self.part.header).strip().lower()] = bytes(self._value).strip()
        self.part.header, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        kind, params = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        if kind.lower() != b"form-data" or b"name" not in params:
            raise BadRequest('every part needs a "Content-Disposition: form-data; name=..." header')
        name, filename = _text(params[b"name"]), _text(params.get(b"filename", b""))
        if name in OPTION_FIELDS and b"filename" not in params:
            if name in self.upload.fields:
                raise BadRequest(f"the form field {name!r} is sent twice")
            self.part.option = name
            return
        if b"filename" not in params:
            check_form_field(name)
        self._open_file(name or filename, filename or name)

    def _open_file(self, key: str, file_name: str) -> None:
        if not key:
            raise BadRequest("a file part has neither a field name nor a file name; send -F 'a.png=@a.png'")
        if key in self._keys:
            raise BadRequest(f"two files are sent under the key {key!r}; give each file its own field name")
        base = safe_file_name(file_name)
        if base == MARKER:
            raise BadRequest(f"the file name {MARKER!r} is reserved by fastDeploy; rename the file")
        if base in self._stored:
            raise BadRequest(f"files {self._stored[base]!r} and {key!r} are both named {base!r}; rename one")
        if len(self.upload.keys) >= self.limits[2]:
            raise PayloadTooLarge(f"more than {self.limits[2]} files in one request (MAX_PER_CLIENT_BATCH, else "
                                  f"{MAX_FILES}): split the request")
        self._stored[base] = key
        self._keys.add(key)
        self.upload.keys.append(key)
        self.upload.names.append(base)
        self.upload.files.open(base)
        self.part.is_file = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        part, size = self.part, end - start
        if part.option is not None:
            part.value += data[start:end]
            if len(part.value) > MAX_FIELD_BYTES:
                raise BadRequest(f"the form field {part.option!r} is longer than {MAX_FIELD_BYTES} bytes")
            return
        part.size += size
        self.total += size
        max_file, max_total, _ = self.limits
        if part.size > max_file:
            raise PayloadTooLarge(f"file {self.upload.keys[-1]!r} is larger than the limit of {max_file} bytes "
                                  "(max_file_mb)")
        if self.total > max_total:
            raise PayloadTooLarge(f"the files of this request are larger than the limit of {max_total} bytes "
                                  "all together (max_upload_mb)")
        if size:
            self.upload.files.write(data, start, end)

    def _end(self) -> None:
        part = self.part
        if part.option is not None:
            self.upload.fields[part.option] = _text(bytes(part.value))
        elif part.is_file:
            self.upload.files.close()

    def _finished(self) -> None:
        self.ended = True


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a form field name, file name or value is not valid UTF-8") from None


def _opened(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # a name the file system folds onto another one (a.txt, A.txt on macOS)
        raise BadRequest(f"two files of this request would be stored as {path.name!r}; rename one") from None
    except OSError as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: OSError) -> Unavailable:
    """503 for the client to retry: the reason names the failure (a full disk), never a server path."""
    return Unavailable(f"cannot store the upload here: {exc.strerror or 'file system error'}", retry_after=5.0)


def _write(fd: int, data: list[memoryview]) -> None:
    """All of ``data``, in as few system calls as it takes (writev: no copy into one buffer first)."""
    try:
        while data:
            data = _unwritten(data, os.writev(fd, data[:_IOV_MAX]))
    except OSError as exc:  # a full disk: the client may retry later
        raise _unavailable(exc) from None


def _unwritten(data: list[memoryview], written: int) -> list[memoryview]:
    """What is left of ``data`` once its first ``written`` bytes are written."""
    for index, view in enumerate(data):
        if written < len(view):
            return [view[written:], *data[index + 1:]]
        written -= len(view)
    return []


def _close(fd: Optional[int]) -> None:
    """Close a written file: where a network file system reports a failed write (NFS: at close), 503."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError as exc:
            raise _unavailable(exc) from None


def boundary_of(content_type: bytes) -> bytes:
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 70:
        raise BadRequest("multipart/form-data needs a boundary of 1 to 70 characters in the Content-Type header "
                         "(curl -F and every HTTP library set it)")
    return boundary


def _incoming(root: Optional[Path]) -> Path:
    """A new private folder for one upload: under the files root (a rename away from its job folder), or temporary.
    A file system that refuses is 503 (the client may retry), and leaves no folder behind. (A disk thread.)"""
    folder: Optional[Path] = None
    try:
        if root is None:
            return Path(tempfile.mkdtemp(prefix="fastdeploy-upload-"))
        owner = _owner(root)
        try:
            folder = Path(tempfile.mkdtemp(dir=owner.folder))
        except FileNotFoundError:  # its folder was removed under it (a sweep took this process for gone)
            folder = Path(tempfile.mkdtemp(dir=_owner(root, stale=owner).folder))
        (folder / MARKER).touch()
        return folder
    except OSError as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise _unavailable(exc) from None


class _Owner:
    """This process's own folder for uploads in progress, ``.incoming/<host>-<pid>-<random>/``. Its owner
    file is locked (flock) for the life of the process, then names the host: the kernel drops the lock
    when the process dies, even by kill -9, so a sweep on the same host can prove the folder orphaned.
    Written only once locked: an empty owner file is one being made, or one whose lock the file system
    refused (then only its age counts)."""

    def __init__(self, root: Path) -> None:
        parent = root / INCOMING
        parent.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_safe_host()}-{os.getpid()}-", dir=parent))
        self.owner_file = self.folder / OWNER_FILE
        try:
            self._fd = os.open(self.owner_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # blocks only while a sweep looks at this fresh, empty file
        except OSError as exc:  # a file system without locks: other API servers go by the file's age alone
            log.debug("no lock on %s (%s): its uploads are removed by age only if this process dies", self.folder,
                      exc.strerror)
            return
        try:
            os.write(self._fd, json.dumps(_identity()).encode())
        except OSError:  # a full disk: no folder, no lock left behind; the upload is 503
            self.close()
            raise

    def renew(self) -> None:
        """Show life to API servers on other hosts (they cannot see the lock): the owner file's time."""
        with contextlib.suppress(OSError):
            os.utime(self.owner_file)

    def close(self) -> None:
        """A clean stop: no upload is in progress any more; the folder goes, then the lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._fd)


_OWNERS: dict[Path, _Owner] = {}  # files root -> this process's incoming folder there, made at the first upload
_OWNERS_LOCK = threading.Lock()  # uploads make their folders on the disk threads, several at a time


def _owner(root: Path, stale: Optional[_Owner] = None) -> _Owner:
    """This process's incoming folder under ``root``; made anew where ``stale`` (removed under it) is still the one."""
    with _OWNERS_LOCK:
        if stale is not None and _OWNERS.get(root) is stale:
            _OWNERS.pop(root).close()
        if root not in _OWNERS:
            _OWNERS[root] = _Owner(root)
        return _OWNERS[root]


async def _own(root: Optional[Path]) -> None:
    """Make this process's incoming folder at its first upload, on a disk thread (503 where it cannot be made)."""
    if root is not None and root not in _OWNERS:
        await asyncio.get_running_loop().run_in_executor(_disk(), _owned, root)


def _owned(root: Path) -> None:
    try:
        _owner(root)
    except OSError as exc:
        raise _unavailable(exc) from None


def let_go(root: Optional[Path]) -> None:
    """At a clean stop of this API server: remove its incoming folder under ``root`` and release its lock."""
    with _OWNERS_LOCK:
        owner = _OWNERS.pop(root, None) if root is not None else None
    if owner is not None:
        owner.close()


@functools.lru_cache(maxsize=1)
def _identity() -> dict[str, Any]:
    """Which kernel this process runs on (the one place its locks mean anything), and its pid."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return {"host": socket.gethostname(), "boot": boot, "pid": os.getpid()}


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


async def receive_upload(
    content_type: bytes, content_length: Optional[int], receive: Receive, root: Optional[Path], *,
    max_file: int, max_total: int, max_files: int, idle: float = IDLE_SECONDS,
) -> Upload:
    """Stream a multipart body to disk, part by part, by the disk threads (its last bytes are written by
    ``Upload.settle`` or ``read``); nothing is left behind unless it succeeds.
    ``max_files`` 0 means MAX_FILES: every file is one more on disk, and one more to delete."""
    boundary = boundary_of(content_type)
    max_files = max_files or MAX_FILES
    if content_length is not None and content_length > max_total + 64 * 1024 + 16 * 1024 * max_files:
        raise PayloadTooLarge(f"the request body is {content_length} bytes; uploads may hold at most {max_total} "
                              "bytes of files (max_upload_mb)")
    await _own(root)
    upload = Upload(_Files(root))
    receiver = _Receiver(upload, max_file, max_total, max_files)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    done = False
    try:
        await _feed(parser, receive, idle, upload.files)
        parser.finalize()
        if not receiver.ended:
            raise BadRequest("the multipart body ends before its closing boundary")
        if not upload.keys:
            raise BadRequest("the form holds no file; send files like curl -F 'a.png=@a.png'")
        done = True
        return upload
    finally:
        if not done:
            await upload.discard()


def _deadline(idle: float) -> AsyncContextManager[Any]:
    """``asyncio.timeout(idle)`` where there is one (Python 3.11+), else nothing (see ``_within``)."""
    timeout = getattr(asyncio, "timeout", None)
    return timeout(idle) if timeout is not None else _no_deadline()


@contextlib.asynccontextmanager
async def _no_deadline() -> AsyncIterator[None]:
    yield None


async def _within(receive: Receive, idle: float) -> Message:
    return await asyncio.wait_for(receive(), idle)


def _parse(parser: MultipartParser, body: bytes) -> None:
    try:
        parser.write(body)
    except MultipartParseError as exc:
        raise BadRequest(f"the multipart body is malformed: {exc}") from None


def _push(deadline: Any, idle: Optional[float]) -> float:
    """Move the idle deadline (an ``asyncio.Timeout``, or None) to ``idle`` seconds from now (None: no
    deadline); returns now."""
    now = asyncio.get_running_loop().time()
    if deadline is not None and not deadline.expired():  # expired: the chunk came too late, 408 at the next await
        deadline.reschedule(None if idle is None else now + idle)
    return now


async def _hand_over(files: _Files, deadline: Any, idle: float) -> float:
    """Hand the backlog to a disk thread once the batch before it is written. The client's idle time
    stands still meanwhile: it cannot send while its upload is not read. Returns when it restarts."""
    _push(deadline, None)
    await files.flush()
    return _push(deadline, idle)


async def _feed(parser: MultipartParser, receive: Receive, idle: float, files: _Files) -> None:
    """Parse the body as it arrives; a client silent for ``idle`` seconds (less at most a quarter) is
    408. The deadline moves a few times per ``idle``, not on every chunk: this loop carries every byte."""
    loop = asyncio.get_running_loop()
    step = idle * _IDLE_STEP
    moved = loop.time()
    if not hasattr(asyncio, "timeout"):  # Python 3.9 and 3.10: a deadline per chunk
        receive = functools.partial(_within, receive, idle)
    try:
        async with _deadline(idle) as deadline:
            while True:
                message = await receive()
                if loop.time() - moved >= step:
                    moved = _push(deadline, idle)
                if message["type"] == "http.disconnect":
                    raise UploadAbandoned("the client left before its upload was complete")
                body = message.get("body", b"")
                if body:
                    _parse(parser, body)
                    files.check()
                    if files.backlog >= FLUSH_BYTES:
                        moved = await _hand_over(files, deadline, idle)
                if not message.get("more_body", False):
                    return
    except (TimeoutError, asyncio.TimeoutError):
        raise UploadStalled(f"the upload sent nothing for {idle:g} s and was dropped; send the body without "
                            "long pauses") from None


@contextlib.asynccontextmanager
async def uploaded_request(
    content_type: bytes, content_length: Optional[int], receive: Receive, settings: Settings, *, sync: bool,
) -> AsyncIterator[ParsedRequest]:
    """A multipart /sync or /async request as a ParsedRequest whose inputs refer to its job folder
    (or carry the files, where no folder is shared). Its files are deleted when the body raises a
    refusal (409, 429, 503: the job was not queued); once queued, they go when the job ends."""
    s = settings
    root = files_root(s)
    max_total = int(s.max_upload_mb * 1024 * 1024) if root is not None else min(
        int(s.max_upload_mb * 1024 * 1024), s.max_body_bytes)
    upload = await receive_upload(content_type, content_length, receive, root, max_total=max_total,
                                  max_file=int(s.max_file_mb * 1024 * 1024), max_files=s.max_per_client_batch)
    settled = False
    try:
        options = form_options(
            upload.fields, sync=sync, allowed_webhook_hosts=s.allowed_webhook_hosts,
            allow_private_webhooks=s.webhook_allow_private,
        )
        job_id = options.unique_id or new_job_id()
        if root is None:
            inputs: list[Any] = await upload.read()
        else:
            folder = await upload.settle(root, job_id)
            inputs = [[name, {_UPLOAD_KEY: folder}] for name in upload.names]
        settled = True
    finally:
        if not settled:
            await upload.discard()
    try:
        yield ParsedRequest(inputs, list(upload.keys), options.priority, options.webhook, job_id, options.timeout)
    except FastDeployError:  # refused before it was queued: nobody will predict it
        await upload.discard()
        raise


# -- the loop's side -----------------------------------------------------------------------
def is_uploaded(inputs: Sequence[Any]) -> bool:
    """Whether a job's inputs refer to uploaded files instead of carrying them."""
    return bool(inputs) and all(
        isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict) and _UPLOAD_KEY in item[1]
        for item in inputs
    )


class UploadMissing(ValueError):
    """A job's uploaded files cannot be found where this process looks (its job fails with the reason)."""


def paths_for(root: Optional[Path], job_id: str, inputs: Sequence[Any]) -> list[str]:
    """The paths of a job's uploaded files, in input order, checked to lie in that job's own folder."""
    if root is None:
        raise UploadMissing("the files were uploaded to a folder this worker does not know: start it with the "
                            "same --files-dir as the API servers")
    if not is_job_id(job_id):  # an id from the store becomes a path only once it fits the grammar
        raise UploadMissing("the job's id is not a valid job id")
    folder = root / folder_name(job_id)
    paths: list[str] = []
    for name, ref in inputs:
        if ref.get(_UPLOAD_KEY) != folder.name or os.path.basename(str(name)) != name or name in ("", ".", ".."):
            raise UploadMissing(f"the job's file reference {str(name)[:80]!r} does not name a file of its own upload")
        path = folder / name
        if not path.is_file():
            raise UploadMissing(f"the uploaded file {name!r} is gone (deleted, or this worker does not share "
                                "--files-dir with the API servers)")
        paths.append(str(path))
    return paths


def delete(root: Optional[Path], job_ids: Iterable[str]) -> None:
    """Delete the folders of jobs that have ended."""
    if root is not None:
        for job_id in job_ids:
            if is_job_id(job_id):  # never a path outside the files root, whatever the store holds
                shutil.rmtree(root / folder_name(job_id), ignore_errors=True)


# -- the sweep (API servers) -------------------------------------------------------------
async def sweep(root: Optional[Path], finished: Callable[[list[str]], Awaitable[set[str]]], now: float) -> int:
    """Delete job folders whose job has ended or is unknown (``finished`` tells, from the store), and
    uploads in progress of API server processes that are gone (``_sweep_incoming``); returns how many
    folders went. The first sweep runs as an API server starts, then every few seconds. The folders are
    read and deleted on a worker thread, so a slow shared folder delays no request and no store call;
    every API server sweeps, so what vanishes half-way (another one deleted it) is skipped."""
    if root is None:
        return 0
    candidates, removed = await asyncio.to_thread(_scan, root, now)
    ids = list(candidates)
    ended: list[str] = []
    for start in range(0, len(ids), 500):
        ended += [candidates[job_id] for job_id in await finished(ids[start:start + 500])]
    if ended:
        await asyncio.to_thread(_remove, ended, now)
    return removed + len(ended)


def _scan(root: Path, now: float) -> tuple[dict[str, str], int]:
    """Job folders old enough to be swept ({job id: path}), after sweeping abandoned incoming uploads."""
    candidates: dict[str, str] = {}
    removed = 0
    errors: list[OSError] = []
    owner = _OWNERS.get(root)
    if owner is not None:  # this process is alive: say so to API servers on other hosts first
        owner.renew()
    for entry in _entries(root, errors):
        try:
            if entry.name == INCOMING:
                removed += _sweep_incoming(Path(entry.path), now, errors)
            elif entry.is_dir(follow_symlinks=False) and _FOLDER.fullmatch(entry.name) and entry.name[0] != ".":
                if entry.stat(follow_symlinks=False).st_mtime < now - SWEEP_GRACE_SECONDS and _ours(entry.path):
                    candidates[job_id_of(entry.name)] = entry.path
        except OSError as exc:
            _note(exc, errors)
    for error in errors:
        if error.errno not in _WARNED:  # once per kind: the sweep runs every few seconds
            _WARNED.add(error.errno)
            log.warning("the upload sweep cannot read part of %s (%s); it skips it and tries again later",
                        root, error.strerror)
    return candidates, removed


_WARNED: set[Optional[int]] = set()  # the errnos the sweep has warned about in this process


def _entries(folder: Path, errors: list[OSError]) -> list[os.DirEntry[str]]:
    """A folder's entries; none when it is gone or cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        _note(exc, errors)
        return []


def _note(exc: OSError, errors: list[OSError]) -> None:
    if not isinstance(exc, FileNotFoundError):  # gone: another API server swept it first
        errors.append(exc)


def _sweep_incoming(parent: Path, now: float, errors: list[OSError]) -> int:
    """The uploads in progress of API server processes that are gone; how many went."""
    removed = 0
    for entry in _entries(parent, errors):
        try:
            if entry.is_dir(follow_symlinks=False):
                removed += _sweep_incoming_folder(Path(entry.path), now)
        except OSError as exc:
            _note(exc, errors)
    return removed


def _sweep_incoming_folder(folder: Path, now: float) -> int:
    """An API server process's incoming folder, removed with its uploads once that process is provably
    gone (this host) or silent for ABANDONED_SECONDS (any host); an upload folder of the layout before
    owners, once it wrote nothing for as long; how many uploads went."""
    owner = folder / OWNER_FILE
    if os.path.lexists(owner):
        gone = _owner_gone(owner)
        if not gone and owner.lstat().st_mtime >= now - ABANDONED_SECONDS:
            return 0
        uploads = sum(1 for p in folder.iterdir() if p.name != OWNER_FILE)
        shutil.rmtree(folder, ignore_errors=True)
        if uploads:
            log.info("removed %d upload(s) left half-way by an API server that is %s", uploads,
                     "gone" if gone else f"silent for {ABANDONED_SECONDS:g} s (on another host?)")
        return uploads
    if folder.lstat().st_mtime >= now - ABANDONED_SECONDS:
        return 0
    if _ours(str(folder)):
        if _last_write(folder) >= now - ABANDONED_SECONDS:
            return 0
        shutil.rmtree(folder, ignore_errors=True)
        return 1
    with contextlib.suppress(OSError):  # a process died making its folder: rmdir takes an empty one only
        folder.rmdir()
    return 0


def _owner_gone(owner: Path) -> bool:
    """Whether the process that owns this incoming folder is provably gone: it ran on this very kernel
    (host name and boot id), and its lock is free. Held, unlockable or still empty: not provable."""
    try:
        fd = os.open(owner, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        about = os.read(fd, 4096)
    except OSError:  # held: its process lives (this one's own too); or a file system without locks
        return False
    finally:
        os.close(fd)
    try:
        identity = json.loads(about)
    except ValueError:  # empty: its process is between making the file and locking it
        return False
    mine = _identity()
    return isinstance(identity, dict) and (identity.get("host"), identity.get("boot")) == (mine["host"], mine["boot"])


def _remove(folders: list[str], now: float) -> None:
    """Delete swept folders, but not one made again since it was listed: a client's id can be used
    again once its job expired, and its new upload (fresh: ``Upload.settle`` touches it) must stay."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if os.stat(folder).st_mtime < now - SWEEP_GRACE_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)


def _ours(folder: str) -> bool:
    """Whether an upload made this folder (the files root may be a folder people keep other things in)."""
    return os.path.exists(os.path.join(folder, MARKER))


def _last_write(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    with contextlib.suppress(OSError):
        times += [p.stat().st_mtime for p in folder.iterdir()]
    return max(times)


def finished_ids(states: Mapping[str, Any], ids: Sequence[str]) -> set[str]:
    """Of ``ids``, those the store no longer holds unfinished (``states``: ``Store.states``'s answer)."""
    return {i for i in ids if i not in states or states[i].status.finished}

