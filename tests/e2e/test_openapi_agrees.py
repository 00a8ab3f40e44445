"""/openapi.json says what the server takes, no more, no less (issue 19, point 14): requests the
document called valid that the server refused, and the reverse, now get the same verdict from both.
tests/e2e/test_fuzz.py checks the same with schemathesis (ST202, positive data acceptance) over
generated requests; these are the cases found by hand, kept as they were reported."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import httpx
import jsonschema_rs
import orjson
import pytest

from tests.helpers import RECIPES, Server, make_file_recipe, serve

LONG_HOST = ".".join(["a" * 63] * 4)  # 255 characters: host names have at most 253


@pytest.fixture(scope="module")
def echo() -> Iterator[Server]:
    # no --webhook-hosts: any host name; loopback allowed, so the URLs below can stay on this machine
    with serve(RECIPES / "echo", env={"BATCH_SIZE": "4", "FASTDEPLOY_WEBHOOK_ALLOW_PRIVATE": "true"}) as server:
        yield server


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(make_file_recipe(tmp_path_factory.mktemp("recipes") / "sizes"), env={"BATCH_SIZE": "4"}) as server:
        yield server


def _body_schema(server: Server, path: str, media_type: str) -> dict[str, Any]:
    operation = server.get("/openapi.json").json()["paths"][path]["post"]
    return operation["requestBody"]["content"][media_type]["schema"]


def _declared(schema: dict[str, Any], value: Any) -> bool:
    return bool(jsonschema_rs.Draft202012Validator(schema).is_valid(value))


def _taken(response: httpx.Response) -> bool:
    """Whether the server took the request: anything but a refusal of the request itself (a 500 for a
    wait past the request's own timeout is taken, as ST202 counts it)."""
    assert "Traceback" not in response.text
    return response.status_code not in (400, 413, 422)


@pytest.mark.parametrize("path, body", [
    ("/async", {"data": [1], "webhook": f"http://{LONG_HOST}/hook"}),  # the document said: any uri
    ("/async", {"data": [1], "webhook": "http://127.0.0.1:0/hook"}),
    ("/async", {"data": [1], "webhook": "ftp://127.0.0.1/hook"}),
    ("/async", {"data": [1], "webhok": "http://127.0.0.1:9/hook"}),  # an unknown key: taken, and dropped
    ("/sync", {"data": [1], "priorty": 2}),
    ("/sync", {"data": [1], "timeout": 0}),
    ("/result", {"unique_id": "x", "wait": True}),
    ("/sync", {"data": [1], "timeout": 30, "priority": 2, "unique_id": None}),
])
def test_a_json_body_is_taken_exactly_when_the_document_says_it_is_valid(
        echo: Server, path: str, body: dict[str, Any]) -> None:
    declared = _declared(_body_schema(echo, path, "application/json"), body)
    response = httpx.post(echo.url + path, json=body, timeout=60)
    assert _taken(response) == declared, (declared, response.status_code, response.text)


@pytest.mark.parametrize("query, body", [
    ("input_type=json&timeout=5e-324", b"[1]"),  # valid: a wait that cannot last (500, as 3.x answered)
    ("input_type=msgpack&timeout=5e-324", b"null"),  # the document took any body; msgpack's null is no list
    ("input_type=json", b'"text"'),
    ("input_type=json", b"[1, 2]"),
])
def test_an_infer_body_is_taken_exactly_when_the_document_says_it_is_valid(
        echo: Server, query: str, body: bytes) -> None:
    value: Optional[Any] = orjson.loads(body)
    declared = _declared(_body_schema(echo, "/infer", "application/octet-stream"), value)
    response = httpx.post(f"{echo.url}/infer?{query}", content=body, timeout=60)
    assert _taken(response) == declared, (declared, response.status_code, response.content[:200])


@pytest.mark.parametrize("parts", [
    [("priority", (None, b"2"))],  # options alone: no file
    [("unique_id", (None, b"form-1")), ("timeout", (None, b"30"))],
    [("a.txt", ("a.txt", b"abc")), ("priority", (None, b"2"))],
])
def test_a_form_is_taken_exactly_when_the_document_says_it_is_valid(
        files: Server, parts: list[tuple[str, Any]]) -> None:
    fields = {name: int(value) if name in ("priority", "timeout") else value.decode()
              for name, (_, value) in parts}
    declared = _declared(_body_schema(files, "/sync", "multipart/form-data"), fields)
    response = httpx.post(files.url + "/sync", files=parts, timeout=60)
    assert _taken(response) == declared, (declared, response.status_code, response.text)
