"""Job states and the small records that move between the API, the store and the loops.

No I/O here. Inputs travel as msgpack (JSON values, or file bytes for FILE recipes);
outputs passed between stages of a chain travel as pickle (stages of one recipe trust
each other and may hand over any Python object), inside an envelope signed with the
service's store secret, so bytes that anyone else wrote into the store are never
unpickled; final predictions are stored as JSON bytes so the API answers without
decoding them.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import msgpack
import orjson


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # by its client (POST /cancel); not predicted, or its outcome discarded

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


# Reasons the loop records; the API maps them to HTTP statuses.
TIMED_OUT_REASON = "timed out: the request waited longer than TIMEOUT seconds and was not predicted"


# Upper bounds of the batch-size histogram loops report with their heartbeat.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def new_job_id() -> str:
    """32 hex digits: the time in microseconds (13), then 76 random bits (19).

    Ids that grow with time land at the right-hand end of the store's id index, so a group
    of new jobs dirties one or two index pages instead of one random page per job (with
    purely random ids, every accepted request cost a 4 KB page write to SQLite's WAL).
    """
    return f"{time.time_ns() // 1000:013x}{os.urandom(10).hex()[1:]}"


@dataclass(frozen=True)
class NewJob:
    """A request accepted by the API, ready to be queued at stage 0."""

    id: str
    payload: bytes
    n_items: int
    priority: int
    deadline: Optional[float] = None  # wall-clock time after which nobody waits (sync)
    webhook: Optional[str] = None
    origin: Optional[str] = None  # doorbell address of the API server whose /sync request waits for the outcome
    owner: str = ""  # who submitted it (an API key's id, or the client's address): its lane, and who may read it


@dataclass
class ClaimedJob:
    """A job a loop holds under lease at one stage."""

    id: str
    stage: int
    payload: bytes
    n_items: int
    deadline: Optional[float]

    def take_payload(self) -> bytes:
        """The payload, let go of here: a loop decodes it once, and a large input should not
        stay in memory beside its decoded form while it is predicted."""
        payload, self.payload = self.payload, b""
        return payload


@dataclass(frozen=True)
class WebhookState:
    """How a job's webhook delivery stands: pending, delivered or failed (given up)."""

    status: str
    attempts: int
    last_error: Optional[str] = None


@dataclass(frozen=True)
class JobView:
    """What /result shows of a job."""

    id: str
    status: JobStatus
    result: Optional[bytes] = None  # JSON bytes of the prediction, when done
    reason: Optional[str] = None  # when failed
    error_status: int = 500  # HTTP status a /sync waiter answers a failure with
    owner: str = ""  # who submitted it (only ``Store.get`` tells)
    webhook: Optional[WebhookState] = None  # only ``Store.get`` tells, for a job that has a webhook


# News of a finished job: its outcome carried whole, or just its id (read it from the store).
ResultNews = Union[JobView, str]


@dataclass(frozen=True)
class Outcome:
    """How one claimed job ended at one stage: next-stage payload, final result or failure."""

    id: str
    stage: int
    payload: Optional[bytes] = None  # input for the next stage (chains)
    n_items: int = 0
    result: Optional[bytes] = None  # final JSON prediction
    reason: Optional[str] = None  # failure
    error_status: int = 500


@dataclass(frozen=True)
class WorkerInfo:
    """What a prediction loop reports about itself with every heartbeat."""

    worker_id: str
    stage: int
    host: str
    pid: int
    batch_size: int
    ready: bool
    seen: float
    stats: dict[str, Any]


# The stats key of the record a supervisor writes for a stage whose loops keep failing to start
# (never ready): why. API servers then answer 503 with it at once instead of waiting for TIMEOUT.
STARTUP_FAILURE = "startup_failure"


def encode_inputs(inputs: list[Any], keys: Optional[list[str]] = None) -> bytes:
    """Stage-0 payload: the request's inputs (file bytes for FILE recipes) and file keys."""
    return msgpack.packb({"i": inputs, "k": keys}, use_bin_type=True)


def decode_inputs(payload: bytes) -> tuple[list[Any], Optional[list[str]]]:
    """The API's msgpack inputs (stage 0 only). msgpack builds plain values, never runs code."""
    data = msgpack.unpackb(payload, raw=False)
    if not isinstance(data, dict) or not isinstance(data.get("i"), list):
        raise ValueError("not a job payload: expected the API's msgpack inputs")
    return data["i"], data.get("k")


# Stage payloads: b"S1" + HMAC-SHA256(secret, b"S1" + pickle) + pickle. The MAC is checked
# before anything is unpickled, so only a process holding the secret can hand a stage code to run.
STAGE_PAYLOAD_TAG = b"S1"
_MAC_SIZE = hashlib.sha256().digest_size
NOT_SIGNED_REASON = "the stage payload is not signed by this service (check --store-secret on every host)"


class UntrustedPayload(ValueError):
    """A payload this stage refuses to load: unsigned, signed with another secret, or the wrong kind."""


def _key(secret: Union[str, bytes]) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise UntrustedPayload("no store secret is set (give --store-secret or FASTDEPLOY_STORE_SECRET)")
    return key


def _mac(key: bytes, body: Union[bytes, memoryview]) -> bytes:
    mac = hmac.new(key, STAGE_PAYLOAD_TAG, hashlib.sha256)
    mac.update(body)  # not tag + body: that would copy a large payload once more
    return mac.digest()


def encode_stage_outputs(outputs: list[Any], keys: Optional[list[str]], secret: Union[str, bytes]) -> bytes:
    """The next stage's payload: the outputs pickled, signed with the service's store secret."""
    key = _key(secret)
    body = pickle.dumps({"i": outputs, "k": keys}, protocol=pickle.HIGHEST_PROTOCOL)
    return STAGE_PAYLOAD_TAG + _mac(key, body) + body


def decode_payload(
    payload: bytes, secret: Union[str, bytes], stage: int
) -> tuple[list[Any], Optional[list[str]]]:
    """A job's inputs at ``stage``: the API's msgpack at stage 0; at later stages only a
    stage payload whose MAC verifies with ``secret``, checked before anything is unpickled.

    Raises ``UntrustedPayload`` for anything else (an unsigned or old ``P`` pickle, a
    payload signed with another secret, a pickle offered to stage 0).
    """
    # bytes or a bytearray (a large value read a slice at a time), never copied whole here
    if stage == 0:
        if payload[:1] == b"P" or payload[: len(STAGE_PAYLOAD_TAG)] == STAGE_PAYLOAD_TAG:
            raise UntrustedPayload("stage 0 takes only the API's msgpack inputs, never a pickled payload")
        return decode_inputs(payload)
    key = _key(secret)
    header = len(STAGE_PAYLOAD_TAG) + _MAC_SIZE
    if len(payload) <= header or payload[: len(STAGE_PAYLOAD_TAG)] != STAGE_PAYLOAD_TAG:
        raise UntrustedPayload(NOT_SIGNED_REASON)
    view = memoryview(payload)
    mac, body = bytes(view[len(STAGE_PAYLOAD_TAG) : header]), view[header:]
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise UntrustedPayload(NOT_SIGNED_REASON)
    data = pickle.loads(body)  # authenticated: written by a stage of this service
    if not isinstance(data, dict) or not isinstance(data.get("i"), list):
        raise ValueError("not a stage payload: expected the previous stage's outputs")
    return data["i"], data.get("k")


_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    # numpy scalars that orjson does not take natively, and other array-likes
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_prediction(outputs: list[Any], keys: Optional[list[str]]) -> bytes:
    """The final prediction as JSON bytes: a list, or an object keyed by the request's file names."""
    value: Any = dict(zip(keys, outputs)) if keys is not None else outputs
    return orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS)
