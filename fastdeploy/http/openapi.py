"""The OpenAPI description served at /openapi.json, shaped by the recipe's input type."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any, Iterable

import orjson

from fastdeploy import __version__
from fastdeploy.payloads import (
    MAX_FILE_NAME_BYTES, MAX_HOST_LABEL, MAX_HOST_NAME, MAX_JSON_DEPTH, MAX_WEBHOOK_URL, UPLOAD_MARKER,
)
from fastdeploy.recipe import Recipe


def _obj(properties: dict[str, Any], required: list[str] | None = None, closed: bool = False) -> dict[str, Any]:
    """An object schema; a ``closed`` one (a request body) refuses keys it does not name, as the server does."""
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


UNIQUE_ID = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$",
             "description": "your own id for the job (absent: the server makes one); 409 while it is in use"}
NULLABLE_UNIQUE_ID = {**UNIQUE_ID, "type": ["string", "null"]}  # in a JSON body, null is the same as absent


def _infer(file_mode: bool, allow_pickle: bool) -> dict[str, Any]:
    """POST /infer, the fastDeploy 3.x protocol: the body is the list of inputs itself, in the
    serialisation ``input_type`` names (pickle listed only where the server takes it)."""
    items = ({"type": "string", "format": "byte",
              "description": "a file's content: base64 text in json, the bytes themselves in msgpack (a [name, "
                             "content] pair gives the file its name)"}
             if file_mode else {"description": "an input: any value msgpack or JSON can carry"})
    input_types = ["msgpack", "json", "pickle"] if allow_pickle else ["msgpack", "json"]

    def query(name: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema, "description": text}

    answer = _obj({"success": {"type": "boolean"}, "unique_id": {"type": ["string", "null"]},
                   "prediction": {"type": ["array", "null"]}, "reason": {"type": ["string", "null"]}},
                  ["success", "unique_id", "prediction", "reason"])
    same = {"schema": {"description": "the same document, in the request's serialisation"}}
    content = {"application/json": {"schema": answer}, "application/msgpack": same, "application/pickle": same,
               "application/octet-stream": {"schema": {"description": "the same document, zstd-compressed"}}}
    return {"post": {
        "summary": "Predict and wait, in the fastDeploy 3.x protocol (fdclient 3.x)",
        "parameters": [
            query("input_type", {"type": "string", "enum": input_types, "default": "json"},
                  "serialisation of the body and the answer; pickle only when the server sets ALLOW_PICKLE"),
            # 3.x read these by their first letter: any value is taken (t..., 1..., y..., on: true; else false)
            query("compressed", {"type": "string", "default": "false"},
                  "body and answer are zstd frames when true (t, 1, y or on, in any case; anything else: false)"),
            query("unique_id", {**UNIQUE_ID, "pattern": "^[A-Za-z0-9._:-]{0,128}$"},
                  "your own job id; empty: the server makes one"),
            query("timeout", {"type": "number", "exclusiveMinimum": 0},
                  "seconds to wait, at most TIMEOUT; a wait past it is answered 500 (as 3.x did)"),
            query("async", {"type": "string", "default": "false"},
                  "queue at /async's priority (still waits) when true (read like compressed)"),
        ],
        "requestBody": {"required": True, "description": "the list of inputs, serialised as input_type says and "
                                                          "zstd-compressed when compressed is true (in json, "
                                                          '{"data": [...]} is taken too, as 3.x did)',
                        "content": {"application/octet-stream": {"schema": {"type": "array", "items": items}}}},
        "responses": {code: {"description": text, "content": content} for code, text in (
            ("200", "predicted"), ("400", "unreadable body, pickle refused, bad query"),
            ("401", "no or wrong API key"), ("409", "unique_id in use"), ("413", "too large"),
            ("429", "too many unfinished jobs"), ("500", "the prediction failed or timed out"),
            ("503", "queue full or store down"))},
    }}


# null means "not given" for both options, as the code takes them; 6.0 is an integer in JSON
# Schema's sense, and the code takes it as 6
PRIORITY = {"type": ["integer", "null"], "minimum": 0, "maximum": 9,
            "description": "0 (first) to 9 (last); null or absent: the default (8 on /sync, 9 on /async); "
                           "a whole number written as a float (6.0) is taken as 6, any other (6.5) is refused"}
TIMEOUT = {"type": ["number", "null"], "exclusiveMinimum": 0,
           "description": "seconds: the request's own deadline; a job past it is not predicted and fails as timed "
                          "out (504 on /sync, which waits at most TIMEOUT whatever it asks); null or absent: none"}
NO_WEBHOOK = {"type": "null", "description": "webhooks are for /async; any other value is refused"}
NO_WEBHOOK_FIELD = {"description": "webhooks are for /async: a webhook field is refused"}

# a webhook URL as the server takes it (payloads.validate_webhook): http or https, a host name of
# RFC 1035 lengths or an IPv4 address, a port from 1 to 65535, no credentials, no spaces, control or
# format characters (those are written percent-encoded); --webhook-hosts pins the host
_PORT = r"(?::(?:0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?)?"
_LABEL = rf"[A-Za-z0-9_-]{{1,{MAX_HOST_LABEL}}}"
_DNS_NAME = rf"(?=[^:/?#]{{1,{MAX_HOST_NAME}}}\.?(?:[:/?#]|$))(?:{_LABEL}\.)*{_LABEL}\.?"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
_REST = (r"(?:[/?#][^\s\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
         r"\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]*)?")


def webhook_pattern(hosts: Iterable[str] = ()) -> str:
    """The webhook URLs the server takes, as a regular expression: any host name (an IPv4 address is
    one), or, with --webhook-hosts, those hosts as written there (any case; an IPv4 address with a final dot too)."""
    listed = sorted(hosts)
    host = "|".join(_listed_host(h) for h in listed) if listed else _DNS_NAME
    return f"^[Hh][Tt][Tt][Pp][Ss]?://(?:{host}){_PORT}{_REST}$"


def _listed_host(host: str) -> str:
    if ":" in host:  # an IPv6 address: in brackets in a URL
        return rf"\[{_any_case(host)}\]"
    dot = r"\.?" if re.fullmatch(_IPV4, host) else ""  # an address's final dot: the server reads the address
    return _any_case(host) + dot


def _any_case(text: str) -> str:
    """``text`` as a pattern matching it in any case (a host name's case does not matter; JSON Schema has no flags)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() and c.isascii() else re.escape(c) for c in text)


def webhook_schema(hosts: Iterable[str]) -> dict[str, Any]:
    """The webhook option of /async: a URL the server takes (``webhook_pattern``), or null (none)."""
    listed = sorted(hosts)
    where = (f"its host one of --webhook-hosts ({', '.join(listed)})" if listed else
             "not a link-local or cloud metadata address, nor a loopback or private one unless the operator allows "
             "them (--webhook-allow-private, --webhook-hosts)")
    return {"type": ["string", "null"], "maxLength": MAX_WEBHOOK_URL, "pattern": webhook_pattern(listed),
            "description": f"http(s) URL the result is POSTed to, {where}; no user:password@; spaces, control and "
                           "format characters percent-encoded; null or absent: no webhook"}


def _data_and_prediction(file_mode: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schemas of ``data`` in a request and ``prediction`` in an answer, with the limits on data."""
    if file_mode:
        return ({"type": "object", "additionalProperties": {"type": "string", "format": "byte"},
                 # refused (400): a name whose base name is empty, "." or "..", and a NUL character
                 "propertyNames": {"not": {"pattern": "(^|[/\\\\])\\.{0,2}$|\\u0000"}},
                 "description": f"file name -> base64 content; a name keeps its base name (path parts are "
                                f"stripped), at most {MAX_FILE_NAME_BYTES} bytes in UTF-8"},
                {"type": "object", "description": "keyed by the request's file names"})
    return ({"type": "array", "items": {}, "description": f"inputs, any JSON values; the request body may nest "
                                                          f"arrays and objects at most {MAX_JSON_DEPTH} levels deep"},
            {"type": "array", "items": {}, "description": "one output per input, in order"})


EXAMPLE_BYTES = 256 * 1024  # a larger example is left out of the document (a browser would hold it)


def _example(recipe: Recipe) -> Any:
    """The recipe's own example as a request's ``data``, so "Try it out" on /docs works as it is;
    None where it cannot be one (too large, not JSON, its files unreadable): the document never fails."""
    try:
        if not recipe.is_file:
            return recipe.example if len(orjson.dumps(recipe.example)) <= EXAMPLE_BYTES else None
        files = [Path(p) for p in recipe.example_paths()]
        if sum(p.stat().st_size for p in files) > EXAMPLE_BYTES:
            return None
        return {p.name: base64.b64encode(p.read_bytes()).decode() for p in files}
    except (orjson.JSONEncodeError, OSError):
        return None


# a file's key the server refuses: its base name empty, "." or "..", or fastDeploy's own marker; a NUL
_MARKER = UPLOAD_MARKER.replace(".", r"\.")
_BAD_FILE_KEY = rf"(^|[/\\])(\.{{0,2}}|{_MARKER})$|\u0000"


def _form(webhook: dict[str, Any] | None) -> dict[str, Any]:
    """A multipart body: every part is a file (its field name, else its file name, is the key),
    except the option fields; at least one file."""
    options: dict[str, Any] = {
        "priority": {"type": "integer", "minimum": 0, "maximum": 9, "description": PRIORITY["description"]},
        "unique_id": {**UNIQUE_ID},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "description": TIMEOUT["description"]},
    }
    # a webhook field is read as the option on /sync too, and refused there
    options["webhook"] = {**webhook, "type": "string"} if webhook is not None else {"not": {}, **NO_WEBHOOK_FIELD}
    return {"schema": {
        "type": "object", "properties": options,
        "additionalProperties": {"type": "string", "contentMediaType": "application/octet-stream"},  # a file
        "propertyNames": {"not": {"pattern": _BAD_FILE_KEY}},
        "minProperties": 1, "not": {"propertyNames": {"enum": list(options)}},  # options alone: no file, refused
        "description": "files streamed to disk as they arrive (--max-file-mb each, --max-upload-mb in all), e.g. "
                       "curl -F a.png=@a.png; option fields as text (empty: not sent); at least one file. A text "
                       "part (no file name) whose name all but matches an option's (webhok, Priority) is refused "
                       "(400); a file part under such a name needs a file name"}}


def _result(prediction: dict[str, Any]) -> dict[str, Any]:
    """The answer of /result."""
    return _obj({
        "unique_id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "processing", "done", "failed", "cancelled", "not_found"]},
        "success": {"type": ["boolean", "null"]},
        "prediction": prediction,
        "reason": {"type": "string"},
    }, ["unique_id", "status", "success"])


def get(summary: str, codes: list[str]) -> dict[str, Any]:
    """A GET endpoint whose answers are described in words only."""
    return {"get": {"summary": summary, "responses": {code: {"description": summary} for code in codes}}}


def openapi_document(recipe: Recipe, webhook_hosts: Iterable[str] = (), allow_pickle: bool = False) -> dict[str, Any]:
    """The document for one recipe, saying what this server takes: ``webhook_hosts`` (--webhook-hosts)
    pins the webhook URLs it declares, ``allow_pickle`` (ALLOW_PICKLE) lists pickle on /infer."""
    data, prediction = _data_and_prediction(recipe.is_file)
    example = _example(recipe)
    priority, webhook, timeout = PRIORITY, webhook_schema(webhook_hosts), TIMEOUT
    failure = _obj({"success": {"type": "boolean", "enum": [False]}, "reason": {"type": "string"}}, ["success", "reason"])
    result = _result(prediction)

    def post(summary: str, body: dict[str, Any], ok: dict[str, Any], codes: list[str],
             with_example: bool = False) -> dict[str, Any]:
        responses = {"200": {"description": "ok", "content": {"application/json": {"schema": ok}}}}
        responses.update({code: {"description": "failure", "content": {"application/json": {"schema": failure}}}
                          for code in codes})
        # the recipe's example: "Try it out" on /docs works as it is
        media = {"schema": body, **({"example": {"data": example}} if with_example and example is not None else {})}
        content = {"application/json": media}
        if with_example and recipe.is_file:  # /sync and /async of a FILE recipe: files as multipart too
            hook = body["properties"]["webhook"]
            content["multipart/form-data"] = _form(webhook=hook if hook is webhook else None)
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": content},
                         "responses": responses}}

    return {
        "openapi": "3.1.0",
        "info": {"title": f"fastDeploy: {recipe.name}", "version": __version__},
        "components": {"securitySchemes": {  # used when the service runs with API keys
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }},
        "paths": {
            "/sync": post("Predict and wait for the result",
                          _obj({"data": data, "priority": priority, "webhook": NO_WEBHOOK,
                                "unique_id": NULLABLE_UNIQUE_ID, "timeout": timeout}, ["data"], closed=True),
                          _obj({"success": {"type": "boolean"}, "unique_id": {"type": "string"}, "prediction": prediction}),
                          ["400", "401", "408", "409", "413", "429", "500", "503", "504"], with_example=True),
            "/infer": _infer(recipe.is_file, allow_pickle),
            "/async": post("Queue a prediction; poll /result or receive a webhook",
                           _obj({"data": data, "priority": priority, "webhook": webhook,
                                 "unique_id": NULLABLE_UNIQUE_ID, "timeout": timeout}, ["data"], closed=True),
                           _obj({"success": {"type": "boolean"}, "unique_id": {"type": "string"}}),
                           ["400", "401", "408", "409", "413", "429", "503"], with_example=True),
            "/result": post("Read a job's status and result",
                            _obj({"unique_id": {"type": "string"}}, ["unique_id"]),
                            result, ["400", "401", "404"]),
            "/cancel": post("Cancel a queued job, or discard the outcome of one being predicted",
                            _obj({"unique_id": {"type": "string"}}, ["unique_id"]),
                            _obj({"success": {"type": "boolean"}, "unique_id": {"type": "string"},
                                  "status": {"type": "string", "enum": ["cancelled"]}}),
                            ["400", "401", "404", "409"]),
            "/health": get("200 while the process is alive", ["200"]),
            "/ready": get("200 once every stage is loaded and serving, else 503", ["200", "503"]),
            "/meta": get("Recipe, stages, batch sizes, workers and limits", ["200"]),
            "/metrics": get("Prometheus metrics", ["200"]),
            "/prometheus_metrics": get("Prometheus metrics (the fastDeploy 3.x name of /metrics)", ["200"]),
            "/status.json": get("What the status page (GET /) shows: the service, stages, loops, requests, "
                                "failures and the webhook outbox, as running totals", ["200", "401"]),
        },
    }
