"""Every answer carries an X-Request-ID and every log line about a request names it (issue #25, point 6),
through the real CLI: the HTTP parser's own 400 for bytes that are not HTTP, the 503 of a connection
beyond --max-connections, and the store's own warning, written on the API server's store thread,
when the store fails under a request. On both HTTP parsers where the parser answers."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_hardening_http import _connect, _read_response, _uvicorn
from tests.helpers import RECIPES, serve, wait_until
from tests.redis_server import PrivateRedis

pytestmark = pytest.mark.timeout(180)


def _logged(server, request_id: str, *words: str) -> str:  # type: ignore[no-untyped-def]
    """The log line naming ``request_id`` (and holding ``words``), once it is written."""
    def line() -> str:
        return next((x for x in server.log().splitlines() if request_id in x and all(w in x for w in words)), "")

    try:
        return wait_until(line, 10, f"a log line with {request_id}")
    except AssertionError:
        raise AssertionError(server.log()[-3000:]) from None


def test_the_parsers_own_400_and_the_connection_cap_503_carry_a_request_id_that_the_log_names():
    env = {"FASTDEPLOY_MAX_CONNECTIONS": "3", "FASTDEPLOY_LOG_LEVEL": "debug"}
    with serve(RECIPES / "echo", env=env) as server:
        sock = _connect(server.port)
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, headers, body = _read_response(sock)
        assert status == 400, body
        document = json.loads(body)
        assert document["success"] is False and "not valid HTTP" in document["reason"], document
        request_id = headers["x-request-id"]
        assert len(request_id) == 32
        _logged(server, request_id, "400")
        sock.close()

        held = [_connect(server.port) for _ in range(3)]
        time.sleep(0.3)  # accepted by now
        status, headers, body = _read_response(_connect(server.port), timeout=3)
        assert status == 503 and json.loads(body)["success"] is False
        _logged(server, headers["x-request-id"], "503")
        for sock in held:
            sock.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_either_parser_answers_bad_bytes_in_the_one_error_shape(parser):
    with _uvicorn(parser, 10, 0) as port:
        sock = _connect(port)
        sock.sendall(b"GET / HTTP/1.1\r\nHost x\r\n\r\n")  # a header line without a colon
        status, headers, body = _read_response(sock)
        assert status == 400 and headers["connection"] == "close" and len(headers["x-request-id"]) == 32
        assert json.loads(body)["success"] is False


@pytest.mark.redis
def test_the_store_warnings_under_a_request_name_it_wherever_they_are_written():
    """A Redis out of memory fails the submit: the store warns on the event loop, at the end of the
    turn and on the store thread, and every one of those lines names the request."""
    redis = PrivateRedis().start()
    try:
        with serve(RECIPES / "echo", args=["--broker", redis.url]) as server:
            assert server.post("/sync", {"data": [1]}).status_code == 200
            client = redis_client(redis.url)
            client.config_set("maxmemory", "1")
            client.config_set("maxmemory-policy", "noeviction")
            answer = server.post("/async", {"data": [2]}, headers={"X-Request-ID": "req-store-thread-7"})
            assert answer.status_code == 503, answer.text
            assert answer.headers["x-request-id"] == "req-store-thread-7"
            _logged(server, "req-store-thread-7", "failed in submit")
            lines = [x for x in server.log().splitlines() if "failed in submit" in x]
            assert lines and all("req-store-thread-7" in x for x in lines), lines
            client.config_set("maxmemory", "0")
            client.close()
    finally:
        redis.cleanup()


def redis_client(url: str):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(url)
