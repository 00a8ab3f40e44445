"""The queue layout of fastDeploy before fair share (commit 0e64de8 and earlier), written by hand:
one sorted set of queued job ids per stage, ``PREFIX:queue:STAGE``, scored priority * 1e12 + seq,
and job hashes without an ``owner`` field. What a Redis holds when it is upgraded under queued jobs."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import time
from typing import Any

from fastdeploy.jobs import encode_inputs
from fastdeploy.store.redis import Keys, _split_url


def write_old_queue(redis_url: str, jobs: list[tuple[str, list[Any]]], *, stage: int = 0, priority: int = 5) -> None:
    """Queue ``jobs`` ((id, inputs) each) at ``stage`` as the earlier version's submit script did."""
    import redis

    url, prefix = _split_url(redis_url)
    keys = Keys(prefix)
    client = redis.Redis.from_url(url)
    try:
        last = client.incrby(keys.seq, len(jobs))
        for seq, (job_id, inputs) in enumerate(jobs, start=last - len(jobs) + 1):
            client.hset(keys.job(job_id), mapping={
                "stage": str(stage), "status": "queued", "priority": str(priority), "seq": seq,
                "payload": encode_inputs(inputs), "n_items": len(inputs), "deadline": "", "webhook": "",
                "origin": "", "attempts": "0", "created": repr(time.time()),
            })
            client.zadd(f"{prefix}:queue:{stage}", {job_id: priority * 10**12 + seq})
        client.sadd(keys.stages, str(stage))
    finally:
        client.close()


def legacy_stage_payload(outputs: list[Any], secret: str) -> bytes:
    """A later stage's payload as versions before job-bound signatures wrote it: ``S1`` + HMAC-SHA256
    over the pickle alone (so it could be moved onto any job)."""
    body = pickle.dumps({"i": outputs, "k": None}, protocol=pickle.HIGHEST_PROTOCOL)
    mac = hmac.new(secret.encode(), b"S1", hashlib.sha256)
    mac.update(body)
    return b"S1" + mac.digest() + body


def write_legacy_chain_jobs(redis_url: str, jobs: list[tuple[str, list[Any]]], secret: str) -> None:
    """Jobs at stage 1 of a chain, in this version's queues but with the earlier stage payload format
    (an upgrade under a chain's jobs, after the queues were moved)."""
    import redis

    url, prefix = _split_url(redis_url)
    keys = Keys(prefix)
    client = redis.Redis.from_url(url)
    try:
        last = client.incrby(keys.seq, len(jobs))
        for seq, (job_id, outputs) in enumerate(jobs, start=last - len(jobs) + 1):
            client.hset(keys.job(job_id), mapping={
                "stage": "1", "status": "queued", "priority": "5", "seq": seq,
                "payload": legacy_stage_payload(outputs, secret), "n_items": len(outputs), "deadline": "",
                "webhook": "", "origin": "", "owner": "", "attempts": "0", "created": repr(time.time()),
            })
            client.zadd(keys.queue(1, ""), {job_id: 5 * 10**12 + seq})
            client.zadd(keys.lanes(1), {"": 0})
        client.sadd(keys.stages, "1")
    finally:
        client.close()
