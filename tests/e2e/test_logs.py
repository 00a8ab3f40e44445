"""What an operator reads, through the real CLI: one log format for every line of every process,
X-Request-ID on every reply and in the log lines of its request, a predictor's failure with its
job's id and the predictor's own traceback, and the start-up story in order."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import requests

from tests.helpers import TEST_RECIPES, Server, serve, wait_until

PACKAGE = Path(__file__).resolve().parents[2] / "fastdeploy"
KEY = "k" * 40
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) \[(supervisor|api|loop stage \d+) pid \d+\] "
    r"[\w.]+: ")


def _records(server: Server) -> list[dict[str, Any]]:
    """Every complete line of the service's output, each parsed as JSON (a line that is not fails the test)."""
    text = server.log()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def _find(server: Server, what: str, **fields: Any) -> dict[str, Any]:
    def match() -> Any:
        return next((r for r in _records(server) if all(r.get(k) == v for k, v in fields.items())), None)

    return wait_until(match, 20, what)


def test_json_logs_carry_role_pid_and_the_request_and_job_they_are_about():
    args = ["--log-format", "json", "--log-level", "debug"]
    with serve(TEST_RECIPES / "faulty", args=args, env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        # a predictor that raises at request time: the client's request id comes back
        response = server.post("/sync", {"data": ["ok", "boom"]}, headers={**AUTH, "X-Request-ID": "req-0001.a"})
        assert response.status_code == 500 and response.headers["X-Request-ID"] == "req-0001.a"
        unique_id = response.json()["unique_id"]

        failure = _find(server, "the loop's warning about the failed job", level="WARNING", unique_id=unique_id)
        assert failure["role"] == "loop stage 0" and failure["logger"] == "fastdeploy.loop"
        assert "ValueError: cannot predict 'boom'" in failure["message"]
        trace = failure["traceback"]
        assert trace.startswith("Traceback") and "faulty/predictor.py" in trace and "in _one" in trace
        assert str(PACKAGE) not in trace, trace  # fastDeploy's own frames are trimmed

        # the API server's line about that request names both ids
        access = _find(server, "the access line of the request", request_id="req-0001.a")
        assert access["role"] == "api" and access["unique_id"] == unique_id and "answered 500" in access["message"]

        records = _records(server)
        roles = {r["role"] for r in records}
        assert {"supervisor", "api", "loop stage 0"} <= roles, roles
        assert all({"time", "level", "role", "pid", "logger", "message"} <= set(r) for r in records)
        assert {r["pid"] for r in records if r["role"] == "supervisor"} == {server.proc.pid}
        assert {r["pid"] for r in records if r["role"] != "supervisor"} <= set(server.children())
        assert any(r["logger"].startswith("uvicorn") and r["role"] == "api" for r in records)  # uvicorn's own, too
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", records[0]["time"])


def test_every_reply_carries_a_request_id():
    with serve(TEST_RECIPES / "faulty", env={"FASTDEPLOY_API_KEYS": KEY}) as server:
        url = server.url
        replies = {
            "sync": requests.post(f"{url}/sync", json={"data": ["a"]}, headers=AUTH, timeout=30),
            "401": requests.post(f"{url}/sync", json={"data": ["a"]}, timeout=30),
            "404": requests.get(f"{url}/no-such-endpoint", headers=AUTH, timeout=30),
            "405": requests.get(f"{url}/sync", headers=AUTH, timeout=30),
            "400": requests.post(f"{url}/async", data=b"{not json", headers=AUTH, timeout=30),
            "infer": requests.post(f"{url}/infer", data=b"\xc1", headers=AUTH, timeout=30),
            "metrics": requests.get(f"{url}/metrics", headers=AUTH, timeout=30),
            "health": requests.get(f"{url}/health", timeout=30),
        }
        assert [r.status_code for r in replies.values()][:5] == [200, 401, 404, 405, 400]
        assert replies["infer"].status_code == 400 and replies["metrics"].status_code == 200
        ids = {name: r.headers.get("X-Request-ID") for name, r in replies.items()}
        assert all(i and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids.values()), ids  # generated
        assert len(set(ids.values())) == len(ids)

        sent = "trace:7f3e/upstream-42"
        for path in ("/sync", "/no-such-endpoint"):
            echoed = requests.post(f"{url}{path}", json={"data": ["a"]}, headers={**AUTH, "X-Request-ID": sent},
                                   timeout=30)
            assert echoed.headers["X-Request-ID"] == sent
        for insane in ("x" * 129, "two words", "<script>"):  # too long or odd characters: a new one instead
            got = requests.get(f"{url}/health", headers={"X-Request-ID": insane}, timeout=30).headers["X-Request-ID"]
            assert re.fullmatch(r"[0-9a-f]{32}", got), got


def test_start_up_tells_each_step_in_order_in_one_format():
    with serve(TEST_RECIPES / "faulty", args=["--batch-size", "0"]) as server:
        text = wait_until(lambda: server.log() if "status page:" in server.log() else "", 30, "the status page URL")
        bad = [line for line in text.splitlines() if not TEXT_LINE.match(line)]
        assert not bad, bad
        steps = ["starting API servers and prediction loops for 'faulty'", "importing the predictor of stage 0",
                 "imported the predictor in ", "warming up on the example (4 input(s))",
                 "batch size | ms per input", "  <- chosen", "stage 0 ready in ",
                 "'faulty' ready in ", f"API:         {server.url}", f"API docs:    {server.url}/docs",
                 f"status page: {server.url}/"]
        at = 0
        for step in steps:
            found = text.find(step, at)
            assert found >= 0, f"{step!r} missing after position {at}:\n{text}"
            at = found + len(step)
        rows = re.findall(r"fastdeploy\.loop: +(\d+) \| +([\d.]+)( +<- chosen)?$", text, flags=re.M)
        assert rows and [int(size) for size, _, _ in rows][:2] == [1, 2]
        assert sum(1 for *_, chosen in rows if chosen) == 1
        assert re.search(r"imported the predictor in \d+\.\d\d s", text)


def test_with_cors_every_reply_still_carries_one_request_id_that_browsers_may_read():
    origin = "https://app.example.com"
    with serve(TEST_RECIPES / "faulty", args=["--cors-origins", origin]) as server:
        preflight = requests.options(f"{server.url}/sync", timeout=30, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-request-id"})
        assert preflight.status_code == 200
        assert "x-request-id" in preflight.headers["Access-Control-Allow-Headers"].lower()
        assert re.fullmatch(r"[0-9a-f]{32}", preflight.headers["X-Request-ID"])
        for path in ("/sync", "/no-such-endpoint"):  # the fast path and Starlette's, behind the CORS middleware
            reply = requests.post(f"{server.url}{path}", json={"data": ["a"]}, timeout=30,
                                  headers={"Origin": origin, "X-Request-ID": "from-the-browser"})
            assert reply.headers["X-Request-ID"] == "from-the-browser"  # once: twice would read "a, a"
            assert "x-request-id" in reply.headers["Access-Control-Expose-Headers"].lower()
