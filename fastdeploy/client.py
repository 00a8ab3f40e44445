"""A Python client for fastDeploy's own API (/sync, /async, /result), blocking and asyncio, on httpx.

    from fastdeploy.client import Client, AsyncClient, PredictionError

    with Client("http://127.0.0.1:8080", api_key=None, timeout=60) as c:
        c.predict(["hello", 42])                          # -> list (POST /sync)
        c.predict_files({"a.png": "photo.png"})            # paths or bytes -> dict keyed by name
        uid = c.submit(["hello"], webhook=None, priority=None)  # POST /async -> unique_id
        c.result(uid)                                      # the /result document
        c.wait(uid, timeout=120)                           # polls with growing delays -> prediction

``AsyncClient`` has the same methods as coroutines. Every call has a time budget (the
client's ``timeout``, or the call's own): answers 503 (queue full, store unreachable) and
429 (too many unfinished jobs of this key) say when to come back (``Retry-After``), and
the call tries again while its budget allows; then, like every other refusal or failed
prediction, it raises ``PredictionError`` with the HTTP status, the job's ``unique_id``
(when there is a job) and the server's ``reason``. Nothing else is retried: a 500 means
the predictor failed on these inputs, and would fail again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import os
import time
from pathlib import Path
from typing import Any, Generator, Generic, Mapping, NamedTuple, Optional, Sequence, TypeVar, Union, cast

import httpx
import orjson

from fastdeploy import __version__
from fastdeploy.payloads import MAX_UPLOAD_FILES, UPLOAD_MARKER

FileLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]
Inputs = Union[Sequence[Any], Mapping[str, FileLike]]
RETRIED = (429, 503)  # statuses that come with Retry-After: try again later
FIRST_POLL = 0.05  # seconds between the first /result polls of wait(); grows 1.5x per poll
LAST_POLL = 2.0  # the longest pause between two polls
MIN_POLL_BUDGET = 0.5  # seconds the last poll of wait() may take, however little of its timeout is left
_OUTCOME_STATUS = {"failed": 500, "cancelled": 409}  # what /sync answers for a job that ended so
T = TypeVar("T")


class PredictionError(Exception):
    """The server refused a request or the prediction failed.

    ``status``: the HTTP status (for ``wait``: 500 for a failed job, 409 for a cancelled one);
    ``unique_id``: the job's id, None when no job was made; ``reason``: the server's explanation.
    """

    def __init__(self, status: int, reason: str, unique_id: Optional[str] = None) -> None:
        self.status = status
        self.reason = reason
        self.unique_id = unique_id
        job = f" (unique_id {unique_id})" if unique_id else ""
        super().__init__(f"HTTP {status}: {reason}{job}")


# -- what both clients share: request bodies, answers, retries ---------------------------
def _base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def _headers(api_key: Optional[str]) -> dict[str, str]:
    headers = {"user-agent": f"fastdeploy-client/{__version__}"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


class _Files(NamedTuple):
    """A multipart body: files by name (a path, opened at each attempt, or bytes) and plain form
    fields. Files go as multipart, which the server streams to disk: no base64, no size bound
    but the server's upload limits, and a path is read as it is sent, never held whole."""

    files: tuple[tuple[str, FileLike], ...]
    fields: dict[str, str]

    def parts(self, stack: contextlib.ExitStack) -> list[tuple[str, tuple[str, Any]]]:
        """httpx's ``files=``: each file under its name, as field and file name (the predictor
        sees that name); paths opened here and closed by ``stack``."""
        parts = []
        for name, value in self.files:
            if isinstance(value, (bytes, bytearray, memoryview)):
                content: Any = bytes(value)
            else:
                content = stack.enter_context(open(Path(value), "rb"))
            parts.append((name, (name, content)))
        return parts


_Body = Union[bytes, _Files]
_JSON = {"content-type": "application/json"}


def _multipart_safe(name: str) -> bool:
    """Whether a file name survives a multipart header unchanged: printable ASCII without ``"``
    or ``\\`` (httpx escapes those and the server's parser keeps the escapes), and one the
    server takes there as it does in JSON."""
    return (name.isascii() and name.isprintable() and '"' not in name and "\\" not in name
            and name.rsplit("/", 1)[-1] not in ("", UPLOAD_MARKER))


def _as_multipart(files: Mapping[str, FileLike]) -> bool:
    """Whether files can go as multipart with the same meaning as in JSON (else: base64 JSON)."""
    return 0 < len(files) <= MAX_UPLOAD_FILES and all(_multipart_safe(str(name)) for name in files)


def _file_bytes(value: FileLike) -> bytes:
    """A file's content: bytes as given, or read from a path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return Path(value).read_bytes()


def _body(inputs: Inputs, priority: Optional[int] = None, webhook: Optional[str] = None,
          unique_id: Optional[str] = None) -> _Body:
    """A /sync or /async body: JSON for a list of inputs, multipart for a mapping of file name
    to path or bytes (a FILE recipe); base64 in JSON when a name would not survive multipart."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs must be a list of inputs (or, for a FILE recipe, a mapping of name to file)")
    extras = {key: value for key, value in (("priority", priority), ("webhook", webhook), ("unique_id", unique_id))
              if value is not None}
    if isinstance(inputs, Mapping) and _as_multipart(inputs):
        return _Files(tuple(inputs.items()), {key: str(value) for key, value in extras.items()})
    if isinstance(inputs, Mapping):
        data: Any = {name: base64.b64encode(_file_bytes(v)).decode("ascii") for name, v in inputs.items()}
    else:
        data = list(inputs)
    return orjson.dumps({"data": data, **extras}, option=orjson.OPT_SERIALIZE_NUMPY)


def _document(response: httpx.Response) -> dict[str, Any]:
    """The answer's JSON document; PredictionError for any status from 400 up."""
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        text = response.text[:300] or response.reason_phrase
        raise PredictionError(response.status_code, f"the answer is not fastDeploy's JSON: {text!r}")
    if response.status_code >= 400:
        reason = str(document.get("reason") or response.reason_phrase or "the request failed")
        raise PredictionError(response.status_code, reason, document.get("unique_id"))
    return document


def _retry_after(response: httpx.Response, deadline: float) -> Optional[float]:
    """Seconds to wait before trying again, or None: not a retried status, or the budget is spent."""
    if response.status_code not in RETRIED:
        return None
    delay = min(max(_seconds(response.headers.get("retry-after", "")), 0.05), 60.0)
    return delay if time.monotonic() + delay < deadline else None


def _seconds(header: str) -> float:
    """A Retry-After value: seconds, or an HTTP date; one second when there is none or it is malformed."""
    try:
        return float(header)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(header).timestamp() - time.time()
    except (ValueError, TypeError, IndexError):
        return 1.0


def _transport_error(exc: httpx.TransportError, url: str, budget: float) -> OSError:
    """A failure to talk to the server, naming the URL it was trying."""
    if isinstance(exc, httpx.TimeoutException):
        return TimeoutError(f"no answer from {url} within the call's timeout of {budget:g} s")
    if isinstance(exc, httpx.ConnectError):
        return ConnectionError(f"cannot connect to fastDeploy at {url} ({exc}); is the server running there?")
    return ConnectionError(f"the connection to {url} failed: {exc}")


def _outcome(document: dict[str, Any], unique_id: str) -> tuple[bool, Any]:
    """(finished, prediction) from a /result document; PredictionError for a job that failed."""
    status = document.get("status")
    if status == "done":
        return True, document.get("prediction")
    if status in _OUTCOME_STATUS:
        raise PredictionError(_OUTCOME_STATUS[status], str(document.get("reason") or status), unique_id)
    return False, None


# -- the calls as plans: every decision made once, the I/O left to each client ------------
# A plan is a generator that yields the I/O steps it needs (a POST, a pause) and is sent
# each step's outcome; what it returns is the call's result. ``Client`` carries out the
# steps with blocking calls, ``AsyncClient`` with coroutines: nothing else differs.
class _Post(NamedTuple):
    """A step: POST ``body`` to ``path``, waiting at most ``timeout`` seconds for the answer."""

    path: str
    body: _Body
    timeout: float


class _Sleep(NamedTuple):
    """A step: pause ``seconds``."""

    seconds: float


class _Done(Generic[T]):
    """The end of a plan: what it returned."""

    __slots__ = ("value",)

    def __init__(self, value: T) -> None:
        self.value = value


_Step = Union[_Post, _Sleep]
_Reply = Union[httpx.Response, httpx.TransportError, None]  # a POST's answer or failure; None after a pause
_Plan = Generator[_Step, Optional[httpx.Response], T]


def _resume(plan: _Plan[T], reply: _Reply) -> Union[_Step, _Done[T]]:
    """Hand ``plan`` its last step's outcome (a transport error is raised where it yielded the
    step; None starts it): its next step, or ``_Done`` with what it returned."""
    try:
        if isinstance(reply, httpx.TransportError):
            return plan.throw(reply)
        return plan.send(reply)
    except StopIteration as done:
        return _Done(done.value)


def _post_plan(url: str, path: str, body: _Body, budget: float) -> _Plan[dict[str, Any]]:
    """POST ``body`` to ``path``: the answer's document; 503 and 429 are tried again after their
    Retry-After while the ``budget`` (seconds) lasts."""
    deadline = time.monotonic() + budget
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer from {url}{path} within the call's timeout of {budget:g} s")
        try:
            response = cast(httpx.Response, (yield _Post(path, body, left)))
        except httpx.TransportError as exc:
            raise _transport_error(exc, url + path, budget) from exc
        delay = _retry_after(response, deadline)
        if delay is None:
            return _document(response)
        yield _Sleep(delay)


def _result_plan(url: str, unique_id: str, budget: float) -> _Plan[dict[str, Any]]:
    """The job's /result document."""
    return _post_plan(url, "/result", orjson.dumps({"unique_id": unique_id}), budget)


def _wait_plan(url: str, unique_id: str, budget: float) -> _Plan[Any]:
    """Poll /result, with growing pauses, until the job ends: its prediction; PredictionError if
    it failed or was cancelled, TimeoutError after ``budget`` seconds."""
    deadline = time.monotonic() + budget
    pause = FIRST_POLL
    while True:
        left = deadline - time.monotonic()
        document = yield from _result_plan(url, unique_id, max(left, MIN_POLL_BUDGET))
        finished, prediction = _outcome(document, unique_id)
        if finished:
            return prediction
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {unique_id} is still {document.get('status')} after {budget:g} s; "
                               "wait again, or read it later with result()")
        yield _Sleep(min(pause, left))
        pause = min(pause * 1.5, LAST_POLL)


class _Base:
    """Settings of a client (where, with which key, the default time budget of a call), and the
    plan of each of its methods."""

    def __init__(self, url: str, api_key: Optional[str], timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.url = _base_url(url)
        self.timeout = float(timeout)
        self._headers = _headers(api_key)

    def _budget(self, timeout: Optional[float]) -> float:
        return self.timeout if timeout is None else float(timeout)

    def _predict_plan(self, inputs: Inputs, priority: Optional[int], unique_id: Optional[str],
                      timeout: Optional[float]) -> _Plan[dict[str, Any]]:
        """POST /sync."""
        return _post_plan(self.url, "/sync", _body(inputs, priority, None, unique_id), self._budget(timeout))

    def _submit_plan(self, inputs: Inputs, webhook: Optional[str], priority: Optional[int],
                     unique_id: Optional[str], timeout: Optional[float]) -> _Plan[dict[str, Any]]:
        """POST /async."""
        return _post_plan(self.url, "/async", _body(inputs, priority, webhook, unique_id), self._budget(timeout))


class Client(_Base):
    """A blocking client; one connection pool, safe to share between threads. Use it as a
    context manager (or call ``close``) so its connections are closed."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 60.0) -> None:
        super().__init__(url, api_key, timeout)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=self.timeout)

    def predict(self, inputs: Sequence[Any], *, priority: Optional[int] = None, unique_id: Optional[str] = None,
                timeout: Optional[float] = None) -> list[Any]:
        """Predict and wait (POST /sync): one output per input, in order."""
        return self._run(self._predict_plan(inputs, priority, unique_id, timeout))["prediction"]

    def predict_files(self, files: Mapping[str, FileLike], *, priority: Optional[int] = None,
                      unique_id: Optional[str] = None, timeout: Optional[float] = None) -> dict[str, Any]:
        """Predict on files (a FILE recipe): name -> path or bytes in, name -> output out."""
        return self._run(self._predict_plan(files, priority, unique_id, timeout))["prediction"]

    def submit(self, inputs: Inputs, webhook: Optional[str] = None, priority: Optional[int] = None, *,
               unique_id: Optional[str] = None, timeout: Optional[float] = None) -> str:
        """Queue a prediction (POST /async) and return its unique_id at once; a mapping is files."""
        return str(self._run(self._submit_plan(inputs, webhook, priority, unique_id, timeout))["unique_id"])

    def result(self, unique_id: str, *, timeout: Optional[float] = None) -> dict[str, Any]:
        """The job's /result document (status, and prediction or reason once it has ended);
        PredictionError 404 when the id is unknown or its result expired."""
        return self._run(_result_plan(self.url, unique_id, self._budget(timeout)))

    def wait(self, unique_id: str, timeout: Optional[float] = None) -> Any:
        """Poll /result, with growing pauses, until the job ends: its prediction, or
        PredictionError if it failed or was cancelled; TimeoutError after ``timeout`` seconds."""
        return self._run(_wait_plan(self.url, unique_id, self._budget(timeout)))

    def _run(self, plan: _Plan[T]) -> T:
        """Carry out ``plan``'s steps with blocking calls: what it returns."""
        step = _resume(plan, None)
        while not isinstance(step, _Done):
            step = _resume(plan, self._perform(step))
        return step.value

    def _perform(self, step: _Step) -> _Reply:
        """One step, blocking: the POST's answer (or the transport error it met); None after a pause."""
        if isinstance(step, _Sleep):
            time.sleep(step.seconds)
            return None
        try:
            if isinstance(step.body, bytes):
                return self._http.post(step.path, content=step.body, headers=_JSON, timeout=step.timeout)
            with contextlib.ExitStack() as stack:
                return self._http.post(step.path, files=step.body.parts(stack), data=step.body.fields,
                                       timeout=step.timeout)
        except httpx.TransportError as exc:
            return exc

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: ``Client``'s methods as coroutines. Use ``async with`` (or await
    ``close``) so its connections are closed."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 60.0) -> None:
        super().__init__(url, api_key, timeout)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self.timeout)

    async def predict(self, inputs: Sequence[Any], *, priority: Optional[int] = None,
                      unique_id: Optional[str] = None, timeout: Optional[float] = None) -> list[Any]:
        """Predict and wait (POST /sync): one output per input, in order."""
        return (await self._run(self._predict_plan(inputs, priority, unique_id, timeout)))["prediction"]

    async def predict_files(self, files: Mapping[str, FileLike], *, priority: Optional[int] = None,
                            unique_id: Optional[str] = None, timeout: Optional[float] = None) -> dict[str, Any]:
        """Predict on files (a FILE recipe): name -> path or bytes in, name -> output out."""
        return (await self._run(self._predict_plan(files, priority, unique_id, timeout)))["prediction"]

    async def submit(self, inputs: Inputs, webhook: Optional[str] = None, priority: Optional[int] = None, *,
                     unique_id: Optional[str] = None, timeout: Optional[float] = None) -> str:
        """Queue a prediction (POST /async) and return its unique_id at once; a mapping is files."""
        return str((await self._run(self._submit_plan(inputs, webhook, priority, unique_id, timeout)))["unique_id"])

    async def result(self, unique_id: str, *, timeout: Optional[float] = None) -> dict[str, Any]:
        """The job's /result document; PredictionError 404 when the id is unknown or expired."""
        return await self._run(_result_plan(self.url, unique_id, self._budget(timeout)))

    async def wait(self, unique_id: str, timeout: Optional[float] = None) -> Any:
        """Poll /result, with growing pauses, until the job ends: its prediction, or
        PredictionError if it failed or was cancelled; TimeoutError after ``timeout`` seconds."""
        return await self._run(_wait_plan(self.url, unique_id, self._budget(timeout)))

    async def _run(self, plan: _Plan[T]) -> T:
        """Carry out ``plan``'s steps with coroutines: what it returns."""
        step = _resume(plan, None)
        while not isinstance(step, _Done):
            step = _resume(plan, await self._perform(step))
        return step.value

    async def _perform(self, step: _Step) -> _Reply:
        """One step, awaited: the POST's answer (or the transport error it met); None after a pause."""
        if isinstance(step, _Sleep):
            await asyncio.sleep(step.seconds)
            return None
        try:
            if isinstance(step.body, bytes):
                return await self._http.post(step.path, content=step.body, headers=_JSON, timeout=step.timeout)
            with contextlib.ExitStack() as stack:  # httpx reads the files in chunks as it sends them
                return await self._http.post(step.path, files=step.body.parts(stack), data=step.body.fields,
                                             timeout=step.timeout)
        except httpx.TransportError as exc:
            return exc

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
