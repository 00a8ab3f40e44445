"""One log format for every process of a service: the role and pid on every line, and the job
and request a line is about, taken from context variables, never formatted in by the caller.

Each process calls ``configure`` once when it starts (the command line does, naming the role:
``supervisor``, ``api`` or ``loop stage N``). uvicorn's own loggers carry no handlers of their
own and reach ours through the root logger. ``text`` reads well in a terminal; ``json`` is one
object per line for log collectors.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import re
import sys
from typing import Any, Iterable, Optional

FORMATS = ("text", "json")
REQUEST_ID_HEADER = "X-Request-ID"

#: the request a line is about (API servers: set when a request arrives, for that request's task)
REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("request_id", default=None)
#: the job a line is about (API servers: set once the request's job has its id)
UNIQUE_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("unique_id", default=None)

# a client's id is taken as is only when it is short and plain: it is written into every log line
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
_HEADER = REQUEST_ID_HEADER.lower().encode()


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's id: the client's ``X-Request-ID`` when it is sane (1-128 of ``A-Za-z0-9._:/+=@-``),
    a new one otherwise. Bound to this request's context (``REQUEST_ID``) for its log lines."""
    rid = ""
    for name, value in headers:
        if name == _HEADER:
            rid = value.decode("ascii") if _SANE_REQUEST_ID.fullmatch(value) else ""
            break
    rid = rid or new_request_id()
    REQUEST_ID.set(rid)
    return rid


def new_request_id() -> str:
    """128 random bits in hex, as a uuid4's hex but a fifth of its cost."""
    return os.urandom(16).hex()


def about_job(unique_id: str) -> dict[str, str]:
    """``extra=`` for a line about one job, where no context variable names it (a loop's batch holds many)."""
    return {"unique_id": unique_id}


class _Context(logging.Filter):
    """Stamps every record with the process role and the job and request it is about."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        if getattr(record, "unique_id", None) is None:
            record.unique_id = UNIQUE_ID.get()
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        about = [f"{name}={value}" for name in ("unique_id", "request_id") if (value := getattr(record, name))]
        record.about = f" [{' '.join(about)}]" if about else ""
        return True


class TextFormatter(logging.Formatter):
    """``2026-01-31 12:00:00.123 INFO [loop stage 0 pid 4321] fastdeploy.loop: message [unique_id=…]``"""

    default_msec_format = "%s.%03d"

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(role)s pid %(process)d] %(name)s: %(message)s%(about)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, role, pid, logger, message, unique_id and
    request_id when the line is about them, traceback when it carries one."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "role": getattr(record, "role", ""),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("unique_id", "request_id"):
            if getattr(record, name, None):
                document[name] = getattr(record, name)
        if record.exc_info:
            document["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False, default=str)


def configure(level: str, fmt: str, role: str) -> None:
    """Send every logger of this process (ours, uvicorn's, Python's warnings) to stderr in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context(role))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    logging.captureWarnings(True)
    # uvicorn's loggers keep no handlers of their own (it is started with log_config=None) and
    # propagate to ours; its start and stop lines, once per API process, only at debug
    uvicorn_level = logging.DEBUG if level.lower() == "debug" else max(logging.WARNING, root.level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.asgi", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(uvicorn_level)
    # httpx logs each request at info with its whole URL, and a webhook's query may carry the
    # receiver's token: the webhook sender logs its own lines (scheme://host:port/path, the job's id)
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))
