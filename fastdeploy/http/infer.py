"""POST /infer: the fastDeploy 3.x wire protocol, so fdclient 3.x works unchanged.

A 3.x client sends the list of inputs as the whole body, serialised as msgpack, JSON or
pickle (query parameter ``input_type``) and zstd-compressed when ``compressed`` is true,
and reads ``{"success", "unique_id", "prediction", "reason"}`` back in the same
serialisation and compression, whatever the outcome (fdclient decodes every answer the
same way, so a refusal in any other shape would reach its user as a decoding error).

This module only translates between that protocol and a ``ParsedRequest``; the request
then takes the same path as /sync (queue, batching, fair share, metrics). Unpickling runs
code, so a pickle body is refused (400) unless the operator turned ALLOW_PICKLE on, and
its bytes are then never unpickled.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import parse_qs

import msgpack
import orjson
import pybase64
import zstandard

from fastdeploy.errors import BadRequest, FastDeployError, PayloadTooLarge
from fastdeploy.service import SyncOutcome
from fastdeploy.payloads import (
    DEFAULT_ASYNC_PRIORITY,
    Body,
    DEFAULT_SYNC_PRIORITY,
    MAX_JSON_DEPTH,
    ParsedRequest,
    check_unique_id,
    unknown_field_reason,
    nested_deeper_than,
    safe_file_name,
)

INPUT_TYPES = ("msgpack", "json", "pickle")
QUERY_PARAMETERS = ("input_type", "compressed", "unique_id", "timeout", "async")  # what fdclient 3.x sends
MEDIA_TYPES = {"json": "application/json", "msgpack": "application/msgpack", "pickle": "application/pickle"}
COMPRESSED_MEDIA_TYPE = "application/octet-stream"  # what 3.x answers whenever the answer is compressed
PICKLE_REFUSED = (
    "pickle bodies are refused: unpickling runs code, and this server does not allow it (ALLOW_PICKLE is off); "
    "send msgpack or json (fdclient 3.x picks msgpack by itself when /meta says pickle is off)"
)
TIMED_OUT = 504  # our status for a request that waited too long; 3.x answered that with 500

_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor(max_window_size=8 << 20)  # a tiny frame may not claim 128 MiB


@dataclass(frozen=True)
class Wire:
    """How one /infer request is encoded, from its query string; every answer to it uses the same."""

    input_type: str  # as asked, when known; json otherwise (its refusal is then readable as JSON)
    compressed: bool
    unique_id: Optional[str]
    timeout: Optional[float]
    is_async: bool
    problem: Optional[str]  # why the query string is refused, if it is

    @classmethod
    def from_query(cls, query_string: bytes) -> "Wire":
        """Read the query string; never raises, so even a bad one is answered in the client's format."""
        query = {k: v[0] for k, v in parse_qs(query_string.decode("latin-1"), keep_blank_values=True).items()}
        problems: list[str] = []
        asked = query.get("input_type", "json")
        if asked not in INPUT_TYPES:
            problems.append(f"input_type {asked[:40]!r} is not supported; use msgpack or json")
        compressed, is_async = _flag(query, "compressed"), _flag(query, "async")
        timeout = _timeout(query.get("timeout"), problems)
        unique_id = query.get("unique_id") or None  # 3.x made one when none (or an empty one) came
        try:
            check_unique_id(unique_id)
        except BadRequest as exc:
            problems.append(exc.reason)
            unique_id = None
        return cls(asked if asked in INPUT_TYPES else "json", compressed, unique_id, timeout, is_async,
                   "; ".join(problems) or None)

    def request(self, body: Body, *, file_mode: bool, max_items: int, max_bytes: int,
                allow_pickle: bool) -> ParsedRequest:
        """The inputs of the body as a ParsedRequest; BadRequest (400) or PayloadTooLarge (413) otherwise."""
        if self.problem:
            raise BadRequest(self.problem)
        if self.input_type == "pickle" and not allow_pickle:
            raise BadRequest(PICKLE_REFUSED)  # checked before the body is even decompressed
        if not body:
            raise BadRequest(f"the request body is empty; send the list of inputs as {self.input_type}")
        raw = _decompress(body, max_bytes) if self.compressed else body
        inputs = _load(raw, self.input_type)
        if self.input_type == "pickle":
            _check_plain(inputs)
        if max_items and len(inputs) > max_items:
            raise PayloadTooLarge(f"{len(inputs)} inputs in one request; at most {max_items} are allowed "
                                  "(MAX_PER_CLIENT_BATCH, MAX_REQUEST_BATCH_SIZE): split the request")
        if nested_deeper_than(inputs, MAX_JSON_DEPTH):
            raise BadRequest(f"the inputs nest lists and maps more than {MAX_JSON_DEPTH} levels deep; flatten them")
        keys = None
        if file_mode:
            inputs, keys = _files(inputs, self.input_type)
        priority = DEFAULT_ASYNC_PRIORITY if self.is_async else DEFAULT_SYNC_PRIORITY
        return ParsedRequest(inputs, keys, priority, None, self.unique_id)

    def answer(self, outcome: SyncOutcome, keys: Optional[list[str]]) -> tuple[int, bytes, str]:
        """Status, body and media type of the answer to a finished wait, built once from its outcome:
        the prediction's JSON bytes go into a JSON answer as they are, and are decoded only to be
        re-encoded as msgpack or pickle, or to put a FILE recipe's outputs back in input order."""
        if outcome.status == 200:
            result = outcome.result or b"null"
            if keys is None and self.input_type == "json":
                return 200, self.encode(True, outcome.job_id, orjson.Fragment(result), None), self.media_type
            prediction = orjson.loads(result)
            if keys is not None and isinstance(prediction, dict):  # a FILE recipe: back in input order, as sent
                prediction = [prediction.get(key) for key in keys]
            return 200, self.encode(True, outcome.job_id, prediction, None), self.media_type
        status = 500 if outcome.status == TIMED_OUT else outcome.status
        return status, self.encode(False, outcome.job_id, None, outcome.reason or "the prediction failed"), self.media_type

    def refusal(self, exc: FastDeployError) -> tuple[int, bytes, str, dict[str, str]]:
        """Status, body, media type and headers of an error, in the client's own format."""
        return exc.status, self.encode(False, self.unique_id, None, exc.reason), self.media_type, exc.headers()

    @property
    def media_type(self) -> str:
        return COMPRESSED_MEDIA_TYPE if self.compressed else MEDIA_TYPES[self.input_type]

    def encode(self, success: bool, unique_id: Optional[str], prediction: Any, reason: Optional[str]) -> bytes:
        """The 3.x answer document; pickle only ever carries values that came from JSON here."""
        document = {"success": success, "unique_id": unique_id, "prediction": prediction, "reason": reason}
        if self.input_type == "msgpack":
            data = msgpack.packb(document, use_bin_type=True)
        elif self.input_type == "pickle":
            data = pickle.dumps(document, protocol=4)
        else:
            data = orjson.dumps(document)
        return _compressor.compress(data) if self.compressed else data


def _flag(query: dict[str, str], name: str) -> bool:
    """A true/false query parameter read as 3.x read it, by its first letter (fdclient sends True and
    False): t..., 1..., y... and on are true, anything else (or nothing) false."""
    text = query.get(name, "").strip().lower()
    return text[:1] in ("t", "1", "y") or text == "on"


def _timeout(text: Optional[str], problems: list[str]) -> Optional[float]:
    """The client's timeout in seconds (the answer comes by then, at most TIMEOUT); None when not sent."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        problems.append(f"timeout must be a positive number of seconds, got {text[:40]!r}")
        return None
    return value


def _decompress(body: Body, limit: int) -> bytes:
    """The zstd frame(s) of ``body``, refusing more than ``limit`` bytes of output (a small body
    can claim gigabytes) and a frame cut short."""
    try:
        declared = zstandard.frame_content_size(body)
        if declared > limit:
            raise PayloadTooLarge(f"the body decompresses to {declared} bytes; "
                                  f"the limit is {limit} bytes (max_body_mb)")
        reader = _decompressor.stream_reader(body, read_across_frames=True)
        parts: list[bytes] = []
        size = 0
        while chunk := reader.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body decompresses to more than the limit of {limit} bytes (max_body_mb)")
            parts.append(chunk)
    except zstandard.ZstdError as exc:
        raise BadRequest(f"compressed=true, but the body is not zstd-compressed data ({exc}); "
                         "send compressed=false for a plain body") from None
    data = b"".join(parts)
    if declared >= 0 and len(data) < declared:
        raise BadRequest(f"the compressed body is cut short: {len(data)} of {declared} bytes")
    return data


def _load(raw: Body, input_type: str) -> list[Any]:
    """The list of inputs in a decompressed body (pickle only when the caller allowed it)."""
    if not raw:
        raise BadRequest(f"the request body is empty; send the list of inputs as {input_type}")
    try:
        if input_type == "msgpack":
            value = msgpack.unpackb(raw, raw=False)
        elif input_type == "pickle":
            value = pickle.loads(raw)  # the operator set ALLOW_PICKLE: its clients are trusted
        else:
            value = orjson.loads(raw)
    except (ValueError, TypeError, msgpack.UnpackException, pickle.UnpicklingError, EOFError, AttributeError,
            ImportError, IndexError, KeyError, RecursionError) as exc:
        detail = f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc).strip() else type(exc).__name__
        raise BadRequest(f"the body is not valid {input_type} ({detail})") from None
    if input_type == "json" and isinstance(value, dict) and "data" in value:  # 3.x took {"data": [...]} too
        value = _data(value)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise BadRequest(f"the body must be a list of inputs, not a {type(value).__name__}")
    return value


def _data(document: dict[str, Any]) -> Any:
    """The inputs of a {"data": [...]} body, which has no other key: options go in the query string."""
    unknown = next((key for key in document if key != "data"), None)
    if unknown is not None:
        reason = unknown_field_reason(unknown, ("data",), "the request body")
        raise BadRequest(f"{reason}; /infer takes its options as query parameters: {', '.join(QUERY_PARAMETERS)}")
    return document["data"]


def _check_plain(inputs: list[Any]) -> None:
    """Unpickled inputs travel to the loop as msgpack, like every other request's: refuse (400)
    objects that cannot, instead of failing later (500)."""
    try:
        msgpack.packb(inputs, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"the unpickled inputs cannot be passed on ({exc}); send plain values: lists, dicts, "
                         "strings, numbers, bytes, None") from None


def _files(inputs: list[Any], input_type: str) -> tuple[list[Any], list[str]]:
    """A FILE recipe's inputs: each is the file's content (bytes; base64 text in JSON), or a
    [name, content] pair so the predictor sees the file's name and extension."""
    files: list[Any] = []
    names: list[str] = []
    seen: dict[str, str] = {}
    for index, item in enumerate(inputs):
        name, content = f"file{index}", item
        if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str):
            name, content = item
        base = safe_file_name(name)
        if base in seen:
            raise BadRequest(f"file names {seen[base]!r} and {name!r} both reduce to {base!r}; give each its own name")
        seen[base] = name
        files.append([base, _file_bytes(content, index, input_type)])
        names.append(name)
    return files, names


def _file_bytes(content: Any, index: int, input_type: str) -> bytes:
    if isinstance(content, (bytes, bytearray)):
        return bytes(content)
    if isinstance(content, str) and input_type == "json":
        try:
            return pybase64.b64decode(content, validate=True)
        except ValueError as exc:  # binascii.Error is a ValueError
            raise BadRequest(f"input {index}: not valid base64 ({exc})") from None
    wanted = "base64 text" if input_type == "json" else "bytes"
    raise BadRequest(f"input {index}: this recipe takes files: send each input as the file's content ({wanted}), "
                     f"or a [name, content] pair, not a {type(content).__name__}")
