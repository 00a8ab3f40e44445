"""Every kind of bad request gets a clear reason and the right status, never a trace,
and the server keeps serving good requests afterwards."""

from __future__ import annotations

import base64

import pytest
import requests

from tests.helpers import RECIPES, serve


@pytest.fixture(scope="module")
def echo():
    with serve(RECIPES / "echo", env={"MAX_PER_CLIENT_BATCH": "3", "FASTDEPLOY_MAX_BODY_MB": "0.01"}) as server:
        yield server


@pytest.fixture(scope="module")
def files():
    with serve(RECIPES / "image_info") as server:
        yield server


def _fails(response: requests.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    assert "Traceback" not in body["reason"]
    for word in words:
        assert word in body["reason"], body["reason"]
    return body


@pytest.mark.parametrize("endpoint", ["/sync", "/async"])
@pytest.mark.parametrize(
    "raw, words",
    [
        (b"{not json", ["not valid JSON"]),
        (b"", ["empty"]),
        (b"[1, 2]", ["JSON object"]),
        (b'"data"', ["JSON object"]),
        (b'{"inputs": [1]}', ["no 'data' key"]),
        (b'{"data": "text"}', ["list"]),
        (b'{"data": 5}', ["list"]),
        (b'{"data": {"a.png": "AAAA"}}', ["JSON inputs", "FILE"]),
        (b'{"data": [1], "priority": 10}', ["priority"]),
        (b'{"data": [1], "priority": "high"}', ["priority"]),
        (b'{"data": [1], "priority": true}', ["priority"]),
    ],
)
def test_malformed_requests_are_400(echo, endpoint, raw, words):
    _fails(echo.post(endpoint, data=raw, headers={"Content-Type": "application/json"}), 400, *words)


@pytest.mark.parametrize(
    "webhook", ["not a url", "ftp://example.com/x", "http://", 42, "http://host:99999/x", "javascript:alert(1)"]
)
def test_invalid_webhook_is_400(echo, webhook):
    _fails(echo.post("/async", {"data": [1], "webhook": webhook}), 400, "webhook")


def test_webhook_on_sync_is_refused(echo):
    _fails(echo.post("/sync", {"data": [1], "webhook": "http://127.0.0.1:1/x"}), 400, "/async")


def test_too_many_inputs_is_413(echo):
    _fails(echo.post("/sync", {"data": [1, 2, 3, 4]}), 413, "MAX_PER_CLIENT_BATCH")
    assert echo.post("/sync", {"data": [1, 2, 3]}).json()["prediction"] == [1, 2, 3]


def test_body_over_the_limit_is_413(echo):
    _fails(echo.post("/sync", {"data": ["x" * 20000]}), 413, "limit")


def test_body_over_the_limit_without_content_length_is_413(echo):
    def chunks():
        for _ in range(20):
            yield b"x" * 1000

    _fails(requests.post(echo.url + "/sync", data=chunks(), timeout=30), 413, "limit")


@pytest.mark.parametrize("body, status", [({}, 400), ({"unique_id": 5}, 400), ({"unique_id": None}, 400)])
def test_result_needs_a_string_id(echo, body, status):
    _fails(echo.post("/result", body), status, "unique_id")


def test_server_still_serves_after_bad_requests(echo):
    for raw in (b"{", b"[]", b'{"data": 1}'):
        echo.post("/sync", data=raw)
    body = echo.post("/sync", {"data": ["fine"]}).json()
    assert body["success"] is True and body["prediction"] == ["fine"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "data, words",
    [
        ([_b64(b"x")], ["takes files"]),
        ({"a.png": "not base64!!"}, ["a.png", "base64"]),
        ({"a.png": "QUJD\nRA=="}, ["base64"]),
        ({"a.png": 17}, ["base64 string"]),
        ({"..": _b64(b"x")}, ["base name"]),
        ({"dir/": _b64(b"x")}, ["base name"]),
        ({"a/x.png": _b64(b"x"), "b\\x.png": _b64(b"y")}, ["x.png", "own name"]),
    ],
)
def test_bad_file_requests_are_400(files, data, words):
    _fails(files.post("/sync", {"data": data}), 400, *words)


def test_file_the_predictor_cannot_read_fails_that_request_only(files):
    body = files.post("/sync", {"data": {"broken.png": _b64(b"this is not an image")}})
    _fails(body, 500, "UnidentifiedImageError")
    good = (RECIPES / "image_info" / "examples" / "red.png").read_bytes()
    assert files.post("/sync", {"data": {"red.png": _b64(good)}}).json()["success"] is True
