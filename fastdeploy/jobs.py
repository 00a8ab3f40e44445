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
import re
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
TIMED_OUT_REASON = "timed out: the request waited longer than its timeout (its own, or TIMEOUT) and was not predicted"


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
    # doorbell address of the API server whose /sync request waits for the outcome ('' when it hears no
    # rings and polls); None: nobody waits (/async), and the result is kept the longer TTL
    origin: Optional[str] = None
    owner: str = ""  # who submitted it (an API key's id, or the client's address): its lane, and who may read it


@dataclass
class ClaimedJob:
    """A job a loop holds under lease at one stage."""

    id: str
    stage: int
    payload: bytes
    n_items: int
    deadline: Optional[float]
    owner: str = ""

    def binding(self) -> Binding:
        """What this job's payload must be signed for."""
        return Binding(self.id, self.stage, self.owner, self.n_items)

    def take_payload(self) -> bytes:
        """The payload, let go of here: a loop decodes it once, and a large input should not
        stay in memory beside its decoded form while it is predicted."""
        payload, self.payload = self.payload, b""
        return payload


@dataclass(frozen=True)
class WebhookState:
    """How a job's webhook delivery stands: pending, delivered or failed (given up), after how many
    attempts, and when the last one ended. Never why: that is in the log only (the reason an attempt
    failed would tell a client what listens at the address it named)."""

    status: str
    attempts: int
    last_attempt_at: Optional[float] = None  # Unix time; None before the first attempt


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


@dataclass(frozen=True)
class JobState:
    """How a job stands without its result (``Store.states``): for whoever decides on its status
    or owner alone, so a large result is never read only to be thrown away."""

    status: JobStatus
    owner: str = ""


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


def decode_inputs(payload: Union[bytes, memoryview]) -> tuple[list[Any], Optional[list[str]]]:
    """The API's msgpack inputs (stage 0 only). msgpack builds plain values, never runs code."""
    data = msgpack.unpackb(payload, raw=False)
    if not isinstance(data, dict) or not isinstance(data.get("i"), list):
        raise ValueError("not a job payload: expected the API's msgpack inputs")
    return data["i"], data.get("k")


# -- what the store hands a loop: ids checked, records authenticated ---------------------
# A store is untrusted input (anyone who can write to an unprotected Redis can write a job), so an
# id read from it becomes a path, a store key or a log field only once it fits the id grammar, and
# with a store secret every field a loop acts on is covered by an HMAC made where the job was
# written: its id, stage, owner, item count and payload (inputs, upload folder, file keys).
MAX_JOB_ID = 128
_JOB_ID = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_JOB_ID)

JOB_RECORD_TAG = b"J1"  # a stage-0 payload signed by the API server that accepted the job
STAGE_PAYLOAD_TAG = b"S2"  # a later stage's payload, signed by the stage before it
_MAC_SIZE = hashlib.sha256().digest_size
_HEADER = len(STAGE_PAYLOAD_TAG) + _MAC_SIZE
NOT_SIGNED_REASON = "the stage payload is not signed by this service (check --store-secret on every host)"
JOB_NOT_SIGNED_REASON = (
    "the job is not signed by this service: it was not written by an API server holding this service's "
    "--store-secret (check --store-secret on every host, API servers included)"
)
JOB_SIGNED_REASON = (
    "the job is signed with a store secret this worker does not have (give it the same --store-secret as the "
    "API servers)"
)


def is_job_id(value: object) -> bool:
    """Whether ``value`` fits the job id grammar: 1 to 128 letters, digits and . _ : -."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Binding:
    """The fields of a job record that its MAC covers beside the payload: what the payload is for."""

    job_id: str
    stage: int  # the stage that reads the payload
    owner: str
    n_items: int

    def packed(self) -> bytes:
        return msgpack.packb([self.job_id, self.stage, self.owner, self.n_items], use_bin_type=True)


class UntrustedPayload(ValueError):
    """A payload this stage refuses to load: unsigned, signed with another secret or for another job, or the wrong kind."""


def _key(secret: Union[str, bytes]) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise UntrustedPayload("no store secret is set (give --store-secret or FASTDEPLOY_STORE_SECRET)")
    return key


def _mac(key: bytes, tag: bytes, binding: Binding, body: Union[bytes, memoryview]) -> bytes:
    mac = hmac.new(key, tag, hashlib.sha256)
    mac.update(binding.packed())
    mac.update(body)  # not tag + body: that would copy a large payload once more
    return mac.digest()


def sign_job(payload: bytes, binding: Binding, secret: Union[str, bytes]) -> bytes:
    """A stage-0 payload (``encode_inputs``) signed for one job: only a process holding the secret
    can queue inputs, and the record cannot be moved to another id, stage or owner."""
    return JOB_RECORD_TAG + _mac(_key(secret), JOB_RECORD_TAG, binding, payload) + payload


def encode_stage_outputs(
    outputs: list[Any], keys: Optional[list[str]], secret: Union[str, bytes], binding: Binding
) -> bytes:
    """The next stage's payload: the outputs pickled, signed for that job and stage with the store secret."""
    key = _key(secret)
    body = pickle.dumps({"i": outputs, "k": keys}, protocol=pickle.HIGHEST_PROTOCOL)
    return STAGE_PAYLOAD_TAG + _mac(key, STAGE_PAYLOAD_TAG, binding, body) + body


_LEGACY_STAGE_TAG = b"S1"  # fastDeploy before job-bound payloads: HMAC over the pickle alone
_MSGPACK_MAPS = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])  # first byte of a msgpack map: the API's inputs


def upgraded_payload(
    payload: bytes, binding: Binding, stage_secret: Union[str, bytes], job_secret: Union[str, bytes]
) -> Optional[bytes]:
    """A queued job's payload written by an earlier version, signed the way this version checks it;
    None when it needs nothing, or cannot be vouched for (its claim then fails it, as before).

    - a later stage's ``S1`` payload whose old MAC verifies with ``stage_secret``: signed again,
      bound to its job and stage;
    - where API servers sign job records (``job_secret``), a stage-0 record of plain inputs: signed
      as it stands. The one moment a record in the store is trusted unsigned: the upgrade itself.
    """
    if binding.stage == 0:
        if job_secret and payload[:1] and payload[0] in _MSGPACK_MAPS:
            return sign_job(payload, binding, job_secret)
        return None
    if not stage_secret or len(payload) <= _HEADER or payload[: len(_LEGACY_STAGE_TAG)] != _LEGACY_STAGE_TAG:
        return None
    key = _key(stage_secret)
    view = memoryview(payload)
    legacy = hmac.new(key, _LEGACY_STAGE_TAG, hashlib.sha256)
    legacy.update(view[_HEADER:])
    if not hmac.compare_digest(bytes(view[len(_LEGACY_STAGE_TAG) : _HEADER]), legacy.digest()):
        return None
    body = view[_HEADER:]
    return STAGE_PAYLOAD_TAG + _mac(key, STAGE_PAYLOAD_TAG, binding, body) + bytes(body)


def _verified(payload: bytes, tag: bytes, key: bytes, binding: Binding, reason: str) -> memoryview:
    """The body of a payload whose MAC verifies for ``binding``; ``UntrustedPayload(reason)`` otherwise."""
    if len(payload) <= _HEADER or payload[: len(tag)] != tag:
        raise UntrustedPayload(reason)
    view = memoryview(payload)
    mac, body = bytes(view[len(tag) : _HEADER]), view[_HEADER:]
    if not hmac.compare_digest(mac, _mac(key, tag, binding, body)):
        raise UntrustedPayload(reason)
    return body


def decode_payload(
    payload: bytes, secret: Union[str, bytes], binding: Binding
) -> tuple[list[Any], Optional[list[str]]]:
    """A claimed job's inputs at ``binding.stage``, checked before anything is decoded.

    Stage 0 reads the API's msgpack inputs: signed for this job (``sign_job``) when ``secret`` is
    given, plain when it is empty. Later stages read only a stage payload whose MAC verifies for
    this job and stage with ``secret``, checked before anything is unpickled. Raises
    ``UntrustedPayload`` for anything else (unsigned, an older format, another key, another
    job's or stage's payload, a pickle offered to stage 0).
    """
    # bytes or a bytearray (a large value read a slice at a time), never copied whole here
    if binding.stage == 0:
        if payload[: len(JOB_RECORD_TAG)] == JOB_RECORD_TAG:
            if not secret:
                raise UntrustedPayload(JOB_SIGNED_REASON)
            return decode_inputs(_verified(payload, JOB_RECORD_TAG, _key(secret), binding, JOB_NOT_SIGNED_REASON))
        if payload[:1] in (b"P", b"S"):
            raise UntrustedPayload("stage 0 takes only the API's msgpack inputs, never a pickled payload")
        if secret:
            raise UntrustedPayload(JOB_NOT_SIGNED_REASON)
        return decode_inputs(payload)
    body = _verified(payload, STAGE_PAYLOAD_TAG, _key(secret), binding, NOT_SIGNED_REASON)
    data = pickle.loads(body)  # authenticated: written by a stage of this service, for this job and stage
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
