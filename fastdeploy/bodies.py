"""Every JSON body fastDeploy sends, in one place: answers, errors, result documents.

Predictions are stored as JSON bytes, so the bodies that carry one are assembled
around those bytes instead of decoding and re-encoding them (a large prediction would
otherwise be parsed once per answer). Everything else goes through orjson.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import orjson

from fastdeploy.jobs import JobStatus, WebhookState

INTERNAL_ERROR = b'{"success":false,"reason":"internal server error; see the server log"}'
ALIVE = b'{"success":true,"status":"alive"}'
READY = b'{"success":true,"status":"ready"}'


Parts = tuple[bytes, ...]
"""A body in pieces, sent one after another: a stored prediction goes out as it was read, not
copied once more into the answer around it (a 90 MB result would be held twice)."""
Body = Union[bytes, Parts]


def joined(body: Body) -> bytes:
    """A body in one piece."""
    return body if isinstance(body, bytes) else b"".join(body)


def _with_prediction(head: dict[str, Any], prediction: Optional[bytes]) -> Parts:
    """``head`` as a JSON object with ``"prediction"`` appended as raw JSON bytes."""
    opening = orjson.dumps(head)[:-1]  # without the closing brace
    return opening + b',"prediction":', prediction or b"null", b"}"


def failure(reason: str, unique_id: Optional[str] = None) -> bytes:
    """The body of every refusal and failed prediction: ``success`` false and a reason a person can act on."""
    document: dict[str, Any] = {"success": False, "reason": reason}
    if unique_id is not None:
        document["unique_id"] = unique_id
    return orjson.dumps(document)


def accepted(unique_id: str) -> bytes:
    """What /async answers: the id to poll /result with."""
    return orjson.dumps({"success": True, "unique_id": unique_id})


def prediction(unique_id: str, result: Optional[bytes]) -> Body:
    """What /sync answers when the prediction succeeded (assembled directly: every /sync pays for it);
    a large prediction in parts around it."""
    opening = b'{"success":true,"unique_id":' + orjson.dumps(unique_id) + b',"prediction":'
    if result is not None and len(result) > LARGE_BYTES:
        return opening, result, b"}"
    return opening + (result or b"null") + b"}"


LARGE_BYTES = 64 * 1024  # a prediction larger than this is sent in parts, not copied into its answer


def result_document(
    job_id: str, status: JobStatus, result: Optional[bytes], reason: Optional[str],
    webhook: Optional[WebhookState] = None,
) -> bytes:
    """What a webhook receives: /result's document in one piece."""
    return joined(result_parts(job_id, status, result, reason, webhook))


def result_parts(
    job_id: str, status: JobStatus, result: Optional[bytes], reason: Optional[str],
    webhook: Optional[WebhookState] = None,
) -> Body:
    """What /result answers and a webhook receives: the job's status, and its outcome once
    finished; /result also tells how the job's webhook delivery stands."""
    head: dict[str, Any] = {"unique_id": job_id, "status": status.value}
    if status is JobStatus.DONE:
        head["success"] = True
    elif status in (JobStatus.FAILED, JobStatus.CANCELLED):
        head.update(success=False, reason=reason or status.value)
    else:
        head["success"] = None
    if webhook is not None:  # after success and reason: the order /result has always had, extended
        head["webhook"] = {"status": webhook.status, "attempts": webhook.attempts,
                           "last_attempt_at": webhook.last_attempt_at}
    return _with_prediction(head, result) if status is JobStatus.DONE else orjson.dumps(head)


def cancelled(unique_id: str, status: str) -> bytes:
    """What /cancel answers: the job will not be answered with a prediction."""
    return orjson.dumps({"success": True, "unique_id": unique_id, "status": status})


def not_found(unique_id: str, result_ttl: float, waited_ttl: float) -> bytes:
    """/result for an id nobody knows, or whose result expired: how long results are kept, so that a
    client who reads a /sync result a minute later learns why it is gone (its job's kind is gone too)."""
    kept = f"results are kept {result_ttl:g} s after their job ends"
    if waited_ttl < result_ttl:
        kept = (f"results of /sync requests (whose caller had the answer) are kept only {waited_ttl:g} s after "
                f"they end, others {result_ttl:g} s")
    reason = f"unique_id {unique_id!r} is unknown or its result has expired: {kept}"
    return orjson.dumps({"unique_id": unique_id, "status": "not_found", "success": False, "reason": reason})


def document(value: Any) -> bytes:
    """Any other JSON answer (meta, openapi)."""
    return orjson.dumps(value)
