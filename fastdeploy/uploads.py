"""Multipart uploads streamed to disk: a FILE recipe's files the way people send them, of any size.

The HTTP layer hands ``receive_upload`` the ASGI receive stream. Parts are parsed as they
arrive (python-multipart) and each file part goes straight into a file of its own in a
private incoming folder, so no file is ever held whole in memory; the size limits are
checked on every chunk (413 as soon as one is passed) and a refused, broken or abandoned
upload deletes its folder at once. A complete upload is renamed (no copy) to
``<files root>/<job id>/`` and the job carries only references to it; the loop hands the
predictor those paths and deletes the folder once the job's outcome is recorded.
``sweep`` removes what a loop never saw: folders of jobs that ended otherwise (cancelled,
timed out, refused) and uploads a killed API server left half-way.

Where no folder is shared with the workers (``--broker`` without ``--files-dir``) the
files are streamed to a private temporary folder all the same, then read into the job
itself and travel through the store like base64 files do (bounded by ``--max-body-mb``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, AsyncContextManager, AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping, Optional, Sequence

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from fastdeploy.errors import BadRequest, FastDeployError, JobExists, PayloadTooLarge, Unavailable
from fastdeploy.jobs import new_job_id
from fastdeploy.payloads import MAX_UPLOAD_FILES, UPLOAD_MARKER, ParsedRequest, form_options, safe_file_name
from fastdeploy.settings import Settings

log = logging.getLogger(__name__)

OPTION_FIELDS = ("webhook", "priority", "unique_id")  # parts read as options; every other part is a file
MAX_FIELD_BYTES = 4096  # an option's value (a webhook URL is at most 2048 characters)
INCOMING = ".incoming"  # under the files root; job folders never start with "."
MARKER = UPLOAD_MARKER
SWEEP_GRACE_SECONDS = 60.0  # a job folder younger than this may belong to a submit in progress
ABANDONED_SECONDS = 3600.0  # an incoming upload that wrote nothing for this long was left by a dead server
MAX_FILES = MAX_UPLOAD_FILES
IDLE_SECONDS = 60.0  # an upload that sends nothing for this long is answered 408 and its files deleted
_IDLE_STEP = 0.25  # the idle deadline is pushed back once per this share of it, not on every chunk
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


@dataclass
class Upload:
    """A received upload: its option fields, and its files (key, name on disk) in ``folder``."""

    folder: Path
    fields: dict[str, str] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def settle(self, root: Path, job_id: str) -> str:
        """Move the files to the job's folder (a rename: no copy); 409 when that job has files already."""
        target = root / folder_name(job_id)
        try:
            os.utime(self.folder)  # the sweep's grace period counts from here
            os.rename(self.folder, target)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise JobExists([job_id]) from None
            raise _unavailable(exc) from None
        self.folder = target
        return target.name

    def read(self) -> list[Any]:
        """The files as ``[name, bytes]`` pairs (where they travel inside the job)."""
        try:
            return [[name, (self.folder / name).read_bytes()] for name in self.names]
        except OSError as exc:
            raise _unavailable(exc) from None

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    option: Optional[str] = None  # the option this part sets; None: a file
    file: Optional[IO[bytes]] = None
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
        self.part.file = _opened(self.upload.folder / base)

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
        assert part.file is not None
        _write(part.file, memoryview(data)[start:end])

    def _end(self) -> None:
        part = self.part
        if part.option is not None:
            self.upload.fields[part.option] = _text(bytes(part.value))
        elif part.file is not None:
            part.file.close()

    def _finished(self) -> None:
        self.ended = True

    def close(self) -> None:
        if self.part.file is not None:
            self.part.file.close()


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a form field name, file name or value is not valid UTF-8") from None


def _opened(path: Path) -> IO[bytes]:
    try:
        return open(path, "xb")
    except FileExistsError:  # a name the file system folds onto another one (a.txt, A.txt on macOS)
        raise BadRequest(f"two files of this request would be stored as {path.name!r}; rename one") from None
    except OSError as exc:
        raise _unavailable(exc) from None


def _unavailable(exc: OSError) -> Unavailable:
    """503 for the client to retry: the reason names the failure (a full disk), never a server path."""
    return Unavailable(f"cannot store the upload here: {exc.strerror or 'file system error'}", retry_after=5.0)


def _write(file: IO[bytes], data: memoryview) -> None:
    try:
        file.write(data)
    except OSError as exc:  # a full disk: the client may retry later
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
    A file system that refuses is 503 (the client may retry), and leaves no folder behind."""
    folder: Optional[Path] = None
    try:
        if root is None:
            return Path(tempfile.mkdtemp(prefix="fastdeploy-upload-"))
        parent = root / INCOMING
        try:
            folder = Path(tempfile.mkdtemp(dir=parent))
        except FileNotFoundError:  # the first upload (or the folder was removed): make it once, not per upload
            parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(dir=parent))
        (folder / MARKER).touch()
        return folder
    except OSError as exc:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise _unavailable(exc) from None


async def receive_upload(
    content_type: bytes, content_length: Optional[int], receive: Receive, root: Optional[Path], *,
    max_file: int, max_total: int, max_files: int, idle: float = IDLE_SECONDS,
) -> Upload:
    """Stream a multipart body to disk, part by part; nothing is left behind unless it succeeds.
    ``max_files`` 0 means MAX_FILES: every file is one more on disk, and one more to delete."""
    boundary = boundary_of(content_type)
    max_files = max_files or MAX_FILES
    if content_length is not None and content_length > max_total + 64 * 1024 + 16 * 1024 * max_files:
        raise PayloadTooLarge(f"the request body is {content_length} bytes; uploads may hold at most {max_total} "
                              "bytes of files (max_upload_mb)")
    upload = Upload(_incoming(root))
    receiver = _Receiver(upload, max_file, max_total, max_files)
    parser = MultipartParser(boundary, receiver.callbacks())  # type: ignore[arg-type]
    done = False
    try:
        await _feed(parser, receive, idle)
        parser.finalize()
        if not receiver.ended:
            raise BadRequest("the multipart body ends before its closing boundary")
        if not upload.keys:
            raise BadRequest("the form holds no file; send files like curl -F 'a.png=@a.png'")
        done = True
        return upload
    finally:
        receiver.close()
        if not done:
            upload.discard()


def _deadline(idle: float) -> AsyncContextManager[Any]:
    """``asyncio.timeout(idle)`` where there is one (Python 3.11+), else nothing (see ``_within``)."""
    timeout = getattr(asyncio, "timeout", None)
    return timeout(idle) if timeout is not None else _no_deadline()


@contextlib.asynccontextmanager
async def _no_deadline() -> AsyncIterator[None]:
    yield None


async def _within(receive: Receive, idle: float) -> Message:
    return await asyncio.wait_for(receive(), idle)


async def _feed(parser: MultipartParser, receive: Receive, idle: float) -> None:
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
                if deadline is not None and loop.time() - moved >= step:
                    moved = loop.time()
                    deadline.reschedule(moved + idle)
                if message["type"] == "http.disconnect":
                    raise UploadAbandoned("the client left before its upload was complete")
                body = message.get("body", b"")
                if body:
                    try:
                        parser.write(body)
                    except MultipartParseError as exc:
                        raise BadRequest(f"the multipart body is malformed: {exc}") from None
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
        priority, webhook, unique_id = form_options(
            upload.fields, sync=sync, allowed_webhook_hosts=s.allowed_webhook_hosts,
            deny_private_webhooks=s.webhook_deny_private,
        )
        job_id = unique_id or new_job_id()
        if root is None:
            inputs: list[Any] = upload.read()
            upload.discard()
        else:
            folder = upload.settle(root, job_id)
            inputs = [[name, {_UPLOAD_KEY: folder}] for name in upload.names]
        settled = True
    finally:
        if not settled:
            upload.discard()
    try:
        yield ParsedRequest(inputs, list(upload.keys), priority, webhook, job_id)
    except FastDeployError:  # refused before it was queued: nobody will predict it
        upload.discard()
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
            shutil.rmtree(root / folder_name(job_id), ignore_errors=True)


# -- the sweep (API servers) -------------------------------------------------------------
async def sweep(root: Optional[Path], finished: Callable[[list[str]], Awaitable[set[str]]], now: float) -> int:
    """Delete job folders whose job has ended or is unknown (``finished`` tells, from the store), and
    incoming uploads untouched for ABANDONED_SECONDS; returns how many folders went. The folders are
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
    removed = 0
    for upload in _entries(parent, errors):
        try:
            stale = upload.is_dir(follow_symlinks=False) and _last_write(Path(upload.path)) < now - ABANDONED_SECONDS
        except OSError as exc:
            _note(exc, errors)
            continue
        if stale and _ours(upload.path):
            shutil.rmtree(upload.path, ignore_errors=True)
            removed += 1
    return removed


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


def finished_ids(views: Mapping[str, Any], ids: Sequence[str]) -> set[str]:
    """Of ``ids``, those the store no longer holds unfinished (``views``: ``Store.get``'s answer)."""
    return {i for i in ids if i not in views or views[i].status.finished}

