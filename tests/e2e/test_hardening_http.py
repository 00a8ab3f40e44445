"""Slow and hostile clients, and input that used to fail late (issue #12, points 2, 5 and 9),
through the real CLI: connections without a complete request head are closed, idle keep-alive
connections too, connections beyond the cap get 503 at once; deep JSON and over-long file
names are 400 at submit; 405 carries Allow; priority 6.0 and null options are taken."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import uvicorn

from tests.helpers import RECIPES, serve

HALF_HEAD = b"POST /sync HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
JSON_HEADERS = {"Content-Type": "application/json"}


# -- raw sockets ----------------------------------------------------------------------
def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within ``within`` seconds;
    whatever it sends first is read and dropped."""
    sock.settimeout(max(0.05, within))
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def _read_response(sock: socket.socket, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a content-length: status, headers (lower-case names), body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of a body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _fails(response: requests.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False
    for word in words:
        assert word in body["reason"], body["reason"]
    return body["reason"]


# -- point 2: connections -------------------------------------------------------------
def test_connections_without_a_complete_request_head_are_closed():
    with serve(RECIPES / "echo", env={"FASTDEPLOY_HEADER_TIMEOUT": "1"}) as server:
        started = time.monotonic()
        half = [_connect(server.port) for _ in range(80)]
        for sock in half:
            sock.sendall(HALF_HEAD)
        silent = [_connect(server.port) for _ in range(80)]
        assert not _closed_by_server(silent[-1], 0.2)  # a deadline, not a refusal
        assert server.post("/sync", {"data": [1]}, timeout=10).json()["prediction"] == [1]  # served meanwhile
        dribbler = _connect(server.port)  # a byte every 0.2 s: more bytes of a head buy no more time
        for byte in HALF_HEAD[:10]:
            try:
                dribbler.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
        deadline = started + 3.5
        for sock in [*half, *silent, dribbler]:
            assert _closed_by_server(sock, deadline - time.monotonic()), "still open after the header timeout"
            sock.close()
        assert server.post("/sync", {"data": [2]}, timeout=10).json()["prediction"] == [2]


def test_idle_keep_alive_connections_are_closed():
    with serve(RECIPES / "echo", env={"KEEP_ALIVE": "1"}) as server:  # fastDeploy 3.x's name still works
        idle = _connect(server.port)
        idle.sendall(HEALTH)
        _read_response(idle)
        answered = time.monotonic()
        assert _closed_by_server(idle, 3)
        assert 0.7 < time.monotonic() - answered < 3.5  # --keep-alive, not uvicorn's 5 s or the 10 s header timeout
        idle.close()
    with serve(RECIPES / "echo", args=["--keep-alive", "1", "--header-timeout", "2"]) as server:
        busy, idle, nudged = _connect(server.port), _connect(server.port), _connect(server.port)
        for sock in (idle, nudged):
            sock.sendall(HEALTH)
            assert _read_response(sock)[0] == 200
        answered = time.monotonic()
        nudged.sendall(b"G")  # a byte of a next request: from now on its head has --header-timeout
        for _ in range(5):  # a client that keeps using its connection keeps it, past both timeouts
            busy.sendall(HEALTH)
            assert _read_response(busy)[0] == 200
            time.sleep(0.5)
        assert _closed_by_server(idle, 0.5), "idle longer than --keep-alive, still open"
        assert _closed_by_server(nudged, answered + 4.0 - time.monotonic())
        busy.close()


def test_connections_beyond_the_cap_get_503_at_once_and_are_logged():
    with serve(RECIPES / "echo", env={"FASTDEPLOY_MAX_CONNECTIONS": "5"}) as server:
        held = [_connect(server.port) for _ in range(5)]
        time.sleep(0.3)  # accepted by now
        extra = _connect(server.port)
        status, headers, body = _read_response(extra, timeout=3)  # answered without sending a request
        assert status == 503 and headers["connection"] == "close" and headers["retry-after"] == "1"
        document = json.loads(body)
        assert document["success"] is False and "--max-connections" in document["reason"]
        assert _closed_by_server(extra, 3)
        refused = server.post("/sync", {"data": [1]}, timeout=10)  # a client that sends at once reads it too
        _fails(refused, 503, "too many open connections")
        held.pop().close()
        deadline = time.monotonic() + 5  # once the server has seen that one close, a place is free again
        while (answer := server.post("/sync", {"data": [1]}, timeout=10)).status_code == 503:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.1)
        assert answer.json()["prediction"] == [1]
        deadline = time.monotonic() + 5
        while "--max-connections" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = server.log()
        assert "refused 1 connection(s) with 503" in log and "--max-connections" in log, log[-3000:]
        for sock in held:
            sock.close()


def _api_pids(server: Any) -> list[int]:
    return [pid for pid in server.children()
            if b"_api" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]


def _soft_open_files(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc")
def test_the_api_process_raises_its_open_file_limit_to_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-file limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))  # the service's processes inherit 200
    try:
        with serve(RECIPES / "echo", env={"FASTDEPLOY_LOG_LEVEL": "debug", "FASTDEPLOY_MAX_CONNECTIONS": "0"}) as server:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            pids = _api_pids(server)
            assert pids
            expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
            assert all(_soft_open_files(pid) == expected for pid in pids)
            assert _soft_open_files(server.proc.pid) == "200"  # only the API servers need it
            assert "open-file limit raised from 200" in server.log()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- the protocol classes themselves, on both of uvicorn's parsers ---------------------
async def _tiny_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _uvicorn(parser: str, header_timeout: float, max_connections: int, keep_alive: float = 5) -> Iterator[int]:
    """uvicorn in a thread with our protocol class on one parser, serving ``_tiny_app``."""
    from fastdeploy.http.connections import Limits, protocol_class

    limits = Limits(header_timeout, max_connections)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_tiny_app, http=protocol_class(limits, parser), lifespan="off", loop="asyncio",
                            log_level="warning", timeout_keep_alive=keep_alive)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        listener.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_head_deadline_on_either_parser(parser):
    with _uvicorn(parser, 0.5, 0, keep_alive=5) as port:
        silent, half, reused = _connect(port), _connect(port), _connect(port)
        half.sendall(b"GET / HTTP/1.1\r\nHo")
        reused.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(reused)[2] == b"ok"
        time.sleep(0.7)  # past the deadline: the complete head disarmed it
        reused.sendall(b"GET / HT")  # the next head, late
        assert _closed_by_server(silent, 1.0) and _closed_by_server(half, 1.0)
        assert _closed_by_server(reused, 1.5)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_late_pipelined_head_lets_the_answer_in_flight_finish(parser):
    with _uvicorn(parser, 0.5, 0, keep_alive=1) as port:
        sock = _connect(port)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HT")  # the answer takes 1 s
        assert _read_response(sock)[2] == b"ok"
        assert _closed_by_server(sock, 2.5)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_connection_cap_on_either_parser(parser):
    with _uvicorn(parser, 10, 3) as port:
        held = [_connect(port) for _ in range(3)]
        time.sleep(0.2)
        status, _, body = _read_response(_connect(port))
        assert status == 503 and json.loads(body)["success"] is False
        held[0].close()
        time.sleep(0.2)
        sock = _connect(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200


# -- point 5: client input ------------------------------------------------------------
@pytest.fixture(scope="module")
def echo():
    with serve(RECIPES / "echo") as server:
        yield server


def _nested_body(depth: int) -> bytes:
    return b'{"data": [' + b"[" * depth + b"1" + b"]" * depth + b"]}"


@pytest.mark.parametrize("endpoint", ["/sync", "/async"])
@pytest.mark.parametrize("depth", [100, 300, 1000])
def test_deeply_nested_json_is_refused_at_submit(echo, endpoint, depth):
    _fails(echo.post(endpoint, data=_nested_body(depth), headers=JSON_HEADERS), 400, "levels deep", "64")


def test_json_nested_within_the_bound_is_served(echo):
    response = echo.post("/sync", data=_nested_body(60), headers=JSON_HEADERS).json()
    assert response["success"] is True and json.dumps(response["prediction"]).count("[") == 61


@pytest.fixture(scope="module")
def file_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("names") / "names"
    folder.mkdir()
    (folder / "predictor.py").write_text(
        "import os\n\ndef predictor(inputs, batch_size=1):\n    return [os.path.basename(p) for p in inputs]\n")
    (folder / "example.py").write_text('input_type = "file"\nexample = ["a.txt"]\n')
    (folder / "a.txt").write_text("hello")
    return folder


def test_file_names_over_255_bytes_are_refused_without_server_paths(file_recipe):
    with serve(file_recipe) as server:
        for name in ("x" * 300 + ".txt", "é" * 128, "some/dir/" + "y" * 256):
            for endpoint in ("/sync", "/async"):
                reason = _fails(server.post(endpoint, {"data": {name: "aGk="}}), 400, "255 bytes")
                assert "/tmp" not in reason and "fastdeploy-files" not in reason and str(file_recipe) not in reason
        longest = "z" * 251 + ".txt"  # 255 bytes: still fine
        body = server.post("/sync", {"data": {longest: "aGk=", "é" * 127: "aGk="}}).json()
        assert body["success"] is True and body["prediction"] == {longest: longest, "é" * 127: "é" * 127}


# -- point 9: smaller -----------------------------------------------------------------
@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/sync", "POST"), ("PUT", "/async", "POST"), ("GET", "/result", "POST"),
    ("POST", "/health", "GET, HEAD"), ("DELETE", "/meta", "GET, HEAD"),
])
def test_405_answers_say_which_methods_are_allowed(echo, method, path, allowed):
    response = requests.request(method, echo.url + path, timeout=10)
    _fails(response, 405, "not allowed", allowed.split(",")[0])
    assert response.headers["Allow"] == allowed


@pytest.mark.parametrize("endpoint", ["/sync", "/async"])
def test_integral_float_priority_is_taken_and_others_refused(echo, endpoint):
    assert echo.post(endpoint, {"data": [1], "priority": 6.0}).json()["success"] is True
    _fails(echo.post(endpoint, {"data": [1], "priority": 6.5}), 400, "whole number")


def test_null_webhook_and_priority_mean_not_given(echo):
    body = echo.post("/async", {"data": [3], "webhook": None, "priority": None}).json()
    assert body["success"] is True
    result = echo.wait_result(body["unique_id"])
    assert result["prediction"] == [3] and "webhook" not in result
    assert echo.post("/sync", {"data": [4], "webhook": None, "priority": None}).json()["prediction"] == [4]
    schema = echo.get("/openapi.json").json()["paths"]["/async"]["post"]["requestBody"]
    properties = schema["content"]["application/json"]["schema"]["properties"]
    assert "null" in properties["webhook"]["type"] and "null" in properties["priority"]["type"]
