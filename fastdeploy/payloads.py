"""Validate request bodies and turn them into job inputs; every rejection says how to fix it."""

from __future__ import annotations

import binascii
import ipaddress
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit

import orjson
import pybase64

from fastdeploy.errors import BadRequest, PayloadTooLarge

DEFAULT_SYNC_PRIORITY = 8
DEFAULT_ASYNC_PRIORITY = 9


@dataclass(frozen=True)
class ParsedRequest:
    """A valid /sync or /async body: inputs (file name and bytes pairs for FILE recipes) and options."""

    inputs: list[Any]
    keys: Optional[list[str]]
    priority: int
    webhook: Optional[str]


def parse_json_body(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadRequest('the request body is empty; send JSON like {"data": [...]}')
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f'the request body must be a JSON object like {{"data": [...]}}, not a {type(value).__name__}')
    return value


def safe_file_name(key: str) -> str:
    """The base name a file is stored under: path parts (/ and \\) stripped."""
    base = key.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", ".."):
        raise BadRequest(f"file name {key!r} has no usable base name; send names like 'photo.png'")
    if "\x00" in base:
        raise BadRequest(f"file name {key!r} contains a NUL character")
    return base


def _decode_files(data: dict[str, Any]) -> tuple[list[Any], list[str]]:
    inputs: list[Any] = []
    seen: dict[str, str] = {}
    for key, encoded in data.items():
        base = safe_file_name(key)
        if base in seen:
            raise BadRequest(f"file names {seen[base]!r} and {key!r} both reduce to {base!r}; give each file its own name")
        seen[base] = key
        if not isinstance(encoded, str):
            raise BadRequest(f"file {key!r}: the value must be a base64 string, not {type(encoded).__name__}")
        try:
            raw = pybase64.b64decode(encoded, validate=True)  # SIMD: ~50x CPython's strict decoder
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"file {key!r} is not valid base64 ({exc}); encode it with base64.b64encode") from None
        inputs.append([base, raw])
    return inputs, list(data)


def _priority(body: dict[str, Any], default: int) -> int:
    value = body.get("priority", default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 9:
        raise BadRequest(f"priority must be an integer from 0 (first) to 9 (last), got {value!r}")
    return value


def validate_webhook(url: Any, allowed_hosts: frozenset[str]) -> str:
    if not isinstance(url, str) or not url:
        raise BadRequest("webhook must be an http(s) URL string")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise BadRequest(f"webhook {url!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest(f"webhook {url!r} must be an absolute http:// or https:// URL")
    if allowed_hosts and host.lower() not in allowed_hosts:
        try:
            literal = str(ipaddress.ip_address(host))
        except ValueError:
            literal = host.lower()
        if literal not in allowed_hosts:
            raise BadRequest(f"webhook host {host!r} is not allowed here; allowed: {', '.join(sorted(allowed_hosts))}")
    return url


def parse_request(
    body: bytes,
    *,
    file_mode: bool,
    sync: bool,
    max_items: int,
    allowed_webhook_hosts: frozenset[str] = frozenset(),
) -> ParsedRequest:
    """Check a /sync or /async body against the recipe's mode and the limits."""
    document = parse_json_body(body)
    if "data" not in document:
        example = '{"data": {"a.png": "<base64>"}}' if file_mode else '{"data": [input1, input2]}'
        raise BadRequest(f"the request has no 'data' key; send {example}")
    data = document["data"]
    if file_mode:
        if not isinstance(data, dict):
            raise BadRequest(
                "this recipe takes files: send data as an object of file name to base64 content, "
                f'like {{"data": {{"a.png": "<base64>"}}}}, not a {type(data).__name__}'
            )
    elif not isinstance(data, list):
        hint = " (objects of files are for FILE recipes)" if isinstance(data, dict) else ""
        raise BadRequest(f"this recipe takes JSON inputs: send data as a list, not a {type(data).__name__}{hint}")
    if max_items and len(data) > max_items:
        raise PayloadTooLarge(
            f"{len(data)} inputs in one request; at most {max_items} are allowed (MAX_PER_CLIENT_BATCH): split the request"
        )
    webhook = document.get("webhook")
    if webhook is not None:
        if sync:
            raise BadRequest("webhook is for /async requests; /sync answers with the prediction itself")
        webhook = validate_webhook(webhook, allowed_webhook_hosts)
    priority = _priority(document, DEFAULT_SYNC_PRIORITY if sync else DEFAULT_ASYNC_PRIORITY)
    if file_mode:
        inputs, keys = _decode_files(data)
        return ParsedRequest(inputs, keys, priority, webhook)
    return ParsedRequest(data, None, priority, webhook)


def parse_unique_id(body: bytes) -> str:
    document = parse_json_body(body)
    unique_id = document.get("unique_id")
    if not isinstance(unique_id, str):
        raise BadRequest('send {"unique_id": "<id from /async or /sync>"}; unique_id must be a string')
    return unique_id
