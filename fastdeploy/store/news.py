"""How result rings travel, for every backend: bare ids, or outcomes carried whole.

A ring is either newline-separated job ids (the API server reads those jobs from the
store) or ``CARRIED`` followed by a msgpack array of ``[id, status, result, reason,
error_status]`` entries, so the API server that waits for them needs no read at all.
Redis's Lua scripts build the second form with ``cmsgpack``, the SQLite store with
``msgpack``: strings may arrive as msgpack str or bin, and a missing value as nil or "".
"""

from __future__ import annotations

from typing import Optional, Sequence

import msgpack

from fastdeploy.jobs import JobStatus, JobView, ResultNews

CARRIED = b"\x01"  # first byte of a ring that carries outcomes


def id_messages(ids: Sequence[str], limit: int) -> list[bytes]:
    """Newline-separated ids, cut into messages of at most ``limit`` bytes at id boundaries
    (counted, not assumed: a client-chosen id may be up to 128 bytes)."""
    messages: list[bytes] = []
    chunk: list[str] = []
    size = 0
    for job_id in ids:
        length = len(job_id.encode()) + 1
        if chunk and size + length > limit:
            messages.append("\n".join(chunk).encode())
            chunk, size = [], 0
        chunk.append(job_id)
        size += length
    if chunk:
        messages.append("\n".join(chunk).encode())
    return messages


def outcome_entry(job_id: str, status: JobStatus, result: Optional[bytes], reason: Optional[str],
                  error_status: int) -> list:
    return [job_id, status.value, result, reason, error_status]


def outcome_messages(entries: Sequence[list], limit: int) -> list[bytes]:
    """Entries packed into messages of at most ``limit`` bytes; an entry too large for one
    travels as its bare id (the API server reads it from the store)."""
    packer = msgpack.Packer()
    messages: list[bytes] = []
    chunk: list[bytes] = []  # entries packed once; a message is an array header plus these
    size = 0
    bare: list[str] = []

    def close_chunk() -> None:
        messages.append(CARRIED + packer.pack_array_header(len(chunk)) + b"".join(chunk))

    for entry in entries:
        if len(entry[2] or b"") > limit:  # a large result is not even packed: that copy would be wasted
            bare.append(entry[0])
            continue
        one = packer.pack(entry)
        if len(one) > limit - 16:
            bare.append(entry[0])
            continue
        if size + len(one) > limit - 16:
            close_chunk()
            chunk, size = [], 0
        chunk.append(one)
        size += len(one)
    if chunk:
        close_chunk()
    return messages + id_messages(bare, limit)


def _text(value: object) -> Optional[str]:
    if value is None or value == b"" or value == "":
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def read_news(message: bytes) -> list[ResultNews]:
    """The news in one ring (raises ValueError or msgpack's errors on a mangled one)."""
    if not message.startswith(CARRIED):
        return [part.decode() for part in message.split(b"\n") if part]
    news: list[ResultNews] = []
    for job_id, status, result, reason, error_status in msgpack.unpackb(message[1:], raw=True):
        if isinstance(result, str):
            result = result.encode()
        news.append(JobView(str(_text(job_id)), JobStatus(_text(status)), result or None, _text(reason),
                            int(error_status or 500)))
    return news
