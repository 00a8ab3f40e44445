"""Job states and the small records that move between the API, the store and the loops.

No I/O here. Inputs travel as msgpack (JSON values, or file bytes for FILE recipes);
outputs passed between stages of a chain travel as pickle (stages of one recipe trust
each other and may hand over any Python object); final predictions are stored as JSON
bytes so the API answers without decoding them.
"""

from __future__ import annotations

import enum
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

    @property
    def finished(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED)


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


@dataclass(frozen=True)
class ClaimedJob:
    """A job a loop holds under lease at one stage."""

    id: str
    stage: int
    payload: bytes
    n_items: int
    deadline: Optional[float]


@dataclass(frozen=True)
class JobView:
    """What /result shows of a job."""

    id: str
    status: JobStatus
    result: Optional[bytes] = None  # JSON bytes of the prediction, when done
    reason: Optional[str] = None  # when failed
    error_status: int = 500  # HTTP status a /sync waiter answers a failure with


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


def encode_inputs(inputs: list[Any], keys: Optional[list[str]] = None) -> bytes:
    """Stage-0 payload: the request's inputs (file bytes for FILE recipes) and file keys."""
    return msgpack.packb({"i": inputs, "k": keys}, use_bin_type=True)


def decode_inputs(payload: bytes) -> tuple[list[Any], Optional[list[str]]]:
    data = msgpack.unpackb(payload, raw=False)
    return data["i"], data["k"]


def encode_stage_outputs(outputs: list[Any], keys: Optional[list[str]]) -> bytes:
    return b"P" + pickle.dumps({"i": outputs, "k": keys}, protocol=pickle.HIGHEST_PROTOCOL)


def decode_payload(payload: bytes) -> tuple[list[Any], Optional[list[str]]]:
    """Decode a job payload at any stage: msgpack from the API, pickle between stages."""
    if payload[:1] == b"P":
        data = pickle.loads(payload[1:])
        return data["i"], data["k"]
    return decode_inputs(payload)


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
