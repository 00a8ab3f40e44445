"""Trust, through the real CLI: API keys, a job seen only by its key, fair share between
clients, a per-key queue bound, cancellation; on both stores where the store is involved."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from tests.helpers import RECIPES, TEST_RECIPES, serve
from tests.webhook_receiver import ALLOW_LOCAL, Receiver

SLOW = TEST_RECIPES / "slow"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- API keys -----------------------------------------------------------------------------
def test_without_a_key_only_health_and_ready_answer():
    with serve(RECIPES / "echo", args=["--api-keys", "k1,k2"]) as server:
        assert server.get("/health").status_code == 200 and server.get("/ready").status_code == 200
        for path, body in (("/sync", {"data": [1]}), ("/async", {"data": [1]}), ("/result", {"unique_id": "x"}),
                           ("/cancel", {"unique_id": "x"})):
            response = server.post(path, body)
            assert response.status_code == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.json()["success"] is False and "API key" in response.json()["reason"]
        for path in ("/meta", "/metrics", "/openapi.json"):
            assert server.get(path).status_code == 401, path
        wrong = server.post("/sync", {"data": [1]}, headers=bearer("k3"))
        assert wrong.status_code == 401 and "not valid" in wrong.json()["reason"]
        assert "k3" not in server.log() and "k1" not in server.log()  # keys are never logged
        assert server.post("/sync", {"data": [1]}, headers=bearer("k1")).json()["prediction"] == [1]
        assert server.post("/sync", {"data": [2]}, headers={"X-API-Key": "k2"}).json()["prediction"] == [2]


def test_metrics_can_be_left_open_for_scrapers():
    with serve(RECIPES / "echo", args=["--api-keys", "k1", "--metrics-open"]) as server:
        assert server.get("/metrics").status_code == 200
        assert server.get("/meta").status_code == 401


def test_a_job_is_seen_and_cancelled_only_with_the_key_that_submitted_it(store_args):
    with serve(RECIPES / "echo", args=["--api-keys", "k1,k2", *store_args]) as server:
        unique_id = server.post("/async", {"data": [7]}, headers=bearer("k1")).json()["unique_id"]
        deadline = time.monotonic() + 30
        while server.post("/result", {"unique_id": unique_id}, headers=bearer("k1")).json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = server.post("/result", {"unique_id": unique_id}, headers=bearer("k2"))
        unknown = server.post("/result", {"unique_id": "0" * 32}, headers=bearer("k2"))
        assert other.status_code == unknown.status_code == 404
        assert other.text.replace(unique_id, "0" * 32) == unknown.text  # exactly as an unknown id
        assert server.post("/cancel", {"unique_id": unique_id}, headers=bearer("k2")).status_code == 404


def test_the_status_page_lists_a_key_only_its_own_failures(store_args):
    with serve(TEST_RECIPES / "faulty", args=["--api-keys", "k1,k2", *store_args]) as server:
        failed = server.post("/sync", {"data": ["boom"]}, headers=bearer("k1"))
        assert failed.status_code == 500 and "cannot predict" in failed.json()["reason"]
        deadline = time.monotonic() + 10
        mine: list = []
        while not mine:  # the document reads the store at most once a second
            assert time.monotonic() < deadline, "k1's failure never showed on its status page"
            mine = server.get("/status.json", headers=bearer("k1")).json()["failures"]
            time.sleep(0.2)
        assert mine[0]["unique_id"] == failed.json()["unique_id"]
        assert server.get("/status.json", headers=bearer("k2")).json()["failures"] == []


def test_the_keys_file_is_reread_on_sighup_without_dropping_requests(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team a\nold-key\nsteady-key\n")
    with serve(RECIPES / "echo", args=["--api-keys-file", str(keys)]) as server:
        assert server.post("/sync", {"data": [1]}, headers=bearer("old-key")).status_code == 200
        assert server.post("/sync", {"data": [1]}, headers=bearer("new-key")).status_code == 401
        failures: list[object] = []
        answered: list[int] = []
        stop = threading.Event()

        def steady() -> None:  # a client that keeps sending while the file changes and the servers reload
            with requests.Session() as session:
                while not stop.is_set():
                    try:  # a key kept across the reload never sees a refusal, nor a dropped request
                        ok = session.post(server.url + "/sync", json={"data": [1]}, headers=bearer("steady-key"),
                                          timeout=10)
                    except requests.RequestException as exc:
                        failures.append(exc)
                        continue
                    if ok.status_code != 200:
                        failures.append(ok.status_code)
                    answered.append(ok.status_code)

        thread = threading.Thread(target=steady)
        thread.start()
        keys.write_text("new-key  # rotated\nsteady-key\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server.post("/sync", {"data": [1]}, headers=bearer("new-key")).status_code != 200:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        stop.set()
        thread.join()
        assert server.post("/sync", {"data": [1]}, headers=bearer("old-key")).status_code == 401
        assert failures == [] and answered and server.proc.poll() is None


def _refused_with(server, key: str, reason: str, timeout: float = 10) -> None:
    """Until ``key`` gets 401 with ``reason`` (the API servers reload on SIGHUP, each on its own)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = server.post("/sync", {"data": [1]}, headers=bearer(key))
        if answer.status_code == 401 and reason in answer.json()["reason"]:
            return
        assert time.monotonic() < deadline, (answer.status_code, answer.text, server.log()[-2000:])
        time.sleep(0.05)


def test_emptying_the_keys_file_revokes_the_last_key_on_sighup_and_says_so(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("the-only-key-0123456789\n")
    with serve(RECIPES / "echo", args=["--api-keys-file", str(keys)]) as server:
        assert server.post("/sync", {"data": [1]}, headers=bearer("the-only-key-0123456789")).status_code == 200
        keys.write_text("# every key removed\n")
        server.proc.send_signal(signal.SIGHUP)
        _refused_with(server, "the-only-key-0123456789", "accepts no API key at the moment")
        warning = "WARNING [api pid"
        assert server.log().count("the API keys file holds no key") == 1 and warning in server.log()
        server.proc.send_signal(signal.SIGHUP)  # said again on every such reload
        deadline = time.monotonic() + 10
        while server.log().count("the API keys file holds no key") < 2:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        assert server.get("/health").status_code == 200 and server.get("/status.json").status_code == 401
        keys.write_text("a-new-key-0123456789\n")  # and a key put back works again
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while server.post("/sync", {"data": [1]}, headers=bearer("a-new-key-0123456789")).status_code != 200:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        assert server.post("/sync", {"data": [1]}, headers=bearer("the-only-key-0123456789")).status_code == 401
        assert "0123456789" not in server.log()  # keys are never logged


def test_a_deleted_keys_file_revokes_its_keys_and_the_status_page_says_so(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("file-key-0123456789\n")
    args = ["--api-keys", "inline-key-0123456789", "--api-keys-file", str(keys)]
    with serve(RECIPES / "echo", args=args) as server:
        assert server.get("/status.json", headers=bearer("inline-key-0123456789")).json()["warnings"] == []
        assert server.post("/sync", {"data": [1]}, headers=bearer("file-key-0123456789")).status_code == 200
        keys.unlink()
        server.proc.send_signal(signal.SIGHUP)
        _refused_with(server, "file-key-0123456789", "not valid")
        assert server.post("/sync", {"data": [1]}, headers=bearer("inline-key-0123456789")).status_code == 200
        [warning] = server.get("/status.json", headers=bearer("inline-key-0123456789")).json()["warnings"]
        assert "the API keys file is missing" in warning and "the --api-keys keys are still accepted" in warning
        assert str(tmp_path) not in warning  # no server path on a page every key holder sees
        assert "the API keys file is missing" in server.log() and str(keys) in server.log()


def test_a_bad_keys_file_stops_the_start_with_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "fastdeploy", "run", str(RECIPES / "echo"), "--api-keys-file",
                          str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--api-keys-file" in out.stderr and "Traceback" not in out.stderr


# -- fair share and per-key bounds ----------------------------------------------------------
def test_a_crowding_key_does_not_delay_another_keys_next_job(store_args):
    env = {"FD_TEST_SLEEP": "0.1", "BATCH_SIZE": "4"}
    with serve(SLOW, args=["--api-keys", "crowd,lone", *store_args], env=env) as server:
        def status(i: str) -> str:
            return server.post("/result", {"unique_id": i}, headers=bearer("crowd")).json()["status"]

        with ThreadPoolExecutor(8) as pool:  # 400 jobs at the first priority: 100 batches, 10 s of work
            ids = list(pool.map(
                lambda i: server.post("/async", {"data": [i], "priority": 0}, headers=bearer("crowd")).json()["unique_id"],
                range(400)))
            started = time.monotonic()
            answer = server.post("/sync", {"data": ["mine"], "priority": 9}, headers=bearer("lone"))
            waited = time.monotonic() - started
            assert answer.status_code == 200 and answer.json()["prediction"][0]["echo"] == "mine"
            statuses = list(pool.map(status, ids))  # read at once: the crowd is still being predicted
        assert statuses.count("done") < 300, "the lone key's job waited behind the crowd"
        assert waited < 1.0, waited  # about one batch (0.1 s), not 100 batches


def _post_from(address: str, url: str, path: str, body: dict) -> dict:
    """POST from a given local address (127.0.0.x): without keys, a client's lane is its address."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30, source_address=(address, 0))
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_without_keys_client_addresses_take_turns(store_args):
    try:  # all of 127/8 is loopback on Linux; not everywhere
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 is not a local address here")
    env = {"FD_TEST_SLEEP": "0.1", "BATCH_SIZE": "4"}
    with serve(SLOW, args=store_args, env=env) as server:
        with ThreadPoolExecutor(8) as pool:  # 400 jobs from 127.0.0.2: 10 s of work
            ids = list(pool.map(lambda i: _post_from("127.0.0.2", server.url, "/async", {"data": [i], "priority": 0})
                                ["unique_id"], range(400)))
            started = time.monotonic()
            answer = _post_from("127.0.0.1", server.url, "/sync", {"data": ["mine"], "priority": 9})
            waited = time.monotonic() - started
            statuses = list(pool.map(lambda i: server.post("/result", {"unique_id": i}).json()["status"], ids))
        assert answer["success"] and answer["prediction"][0]["echo"] == "mine"
        assert statuses.count("done") < 300, "the other address's job waited behind the crowd"
        assert waited < 1.0, waited  # about one batch (0.1 s), not 100 batches


@pytest.mark.parametrize("trusted", [True, False])
def test_without_keys_a_trusted_proxys_forwarded_for_names_the_client(trusted):
    """The per-client bound (and lane) of a client behind a proxy on this host: X-Forwarded-For,
    believed from --forwarded-allow-ips only."""
    args = ["--queue-limit-per-key", "2", "--forwarded-allow-ips", "127.0.0.1" if trusted else "none"]
    with serve(SLOW, args=args, env={"FD_TEST_SLEEP": "5", "BATCH_SIZE": "1"}) as server:
        def post(client: str) -> int:
            return server.post("/async", {"data": [client]}, headers={"X-Forwarded-For": client}).status_code

        assert [post("10.0.0.1") for _ in range(3)] == [200, 200, 429]
        assert post("10.0.0.2") == (200 if trusted else 429)  # another client, or the same proxy address


def test_more_unfinished_jobs_than_the_per_key_bound_get_429_and_other_keys_go_on(store_args):
    env = {"FD_TEST_SLEEP": "0.5", "BATCH_SIZE": "1"}
    args = ["--api-keys", "a,b", "--queue-limit-per-key", "5", *store_args]
    with serve(SLOW, args=args, env=env) as server:
        codes = [server.post("/async", {"data": [i]}, headers=bearer("a")).status_code for i in range(8)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429] * 3
        refused = server.post("/async", {"data": [9]}, headers=bearer("a"))
        assert "Retry-After" in refused.headers and "QUEUE_LIMIT_PER_KEY" in refused.json()["reason"]
        assert server.post("/async", {"data": [1]}, headers=bearer("b")).status_code == 200


# -- cancellation -------------------------------------------------------------------------
def _status(server, unique_id: str) -> str:
    return server.post("/result", {"unique_id": unique_id}).json()["status"]


def _wait_status(server, unique_id: str, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _status(server, unique_id) != want:
        assert time.monotonic() < deadline, (unique_id, _status(server, unique_id))
        time.sleep(0.02)


def test_cancel_a_queued_a_running_and_a_finished_job(store_args, tmp_path):
    log = tmp_path / "calls.jsonl"
    env = {"FD_TEST_SLEEP": "1.0", "BATCH_SIZE": "1", "FD_TEST_LOG": str(log)}
    with Receiver() as receiver, serve(SLOW, args=[*store_args, *ALLOW_LOCAL], env=env) as server:
        running = server.post("/async", {"data": ["running"]}).json()["unique_id"]
        _wait_status(server, running, "processing")
        queued = server.post("/async", {"data": ["queued"], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        assert _status(server, queued) == "queued"
        answer = server.post("/cancel", {"unique_id": queued})
        assert answer.status_code == 200 and answer.json() == {"success": True, "unique_id": queued,
                                                                "status": "cancelled"}
        result = server.post("/result", {"unique_id": queued}).json()
        assert result["status"] == "cancelled" and result["success"] is False
        (hook,) = receiver.wait_for("/ok", 1)
        assert hook["unique_id"] == queued and hook["status"] == "cancelled"
        assert server.post("/cancel", {"unique_id": running}).json()["status"] == "cancelled"
        time.sleep(1.5)  # the prediction in progress ends; its outcome is discarded
        assert _status(server, running) == "cancelled"
        predicted = log.read_text()
        assert "running" in predicted and '"queued"' not in predicted  # the queued one never ran
        done = server.post("/sync", {"data": ["done"]}).json()["unique_id"]
        conflict = server.post("/cancel", {"unique_id": done})
        assert conflict.status_code == 409 and "already ended" in conflict.json()["reason"]
        assert server.post("/cancel", {"unique_id": "0" * 32}).status_code == 404


# -- webhook delivery state in /result ------------------------------------------------------
def test_result_tells_how_the_webhook_delivery_stands(store_args):
    # a failed attempt is counted once its --webhook-timeout has run out: 2 s keeps the test short
    env = {"FASTDEPLOY_WEBHOOK_ATTEMPTS": "2", "FASTDEPLOY_WEBHOOK_BACKOFF": "0.1", "FASTDEPLOY_WEBHOOK_TIMEOUT": "2"}
    with Receiver() as receiver, serve(RECIPES / "echo", args=[*store_args, *ALLOW_LOCAL], env=env) as server:
        ok = server.post("/async", {"data": [1], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        dead = server.post("/async", {"data": [2], "webhook": "http://127.0.0.1:9/refused"}).json()["unique_id"]
        plain = server.post("/async", {"data": [3]}).json()["unique_id"]
        hung = server.post("/async", {"data": [4], "webhook": receiver.url + "/hang"}).json()["unique_id"]
        receiver.wait_for("/hang", 1)  # its first attempt is under way: the job is done, its webhook pending
        assert server.post("/result", {"unique_id": hung}).json()["webhook"]["status"] == "pending"
        receiver.wait_for("/ok", 1)
        deadline = time.monotonic() + 30
        while True:
            states = {i: server.post("/result", {"unique_id": i}).json().get("webhook") for i in (ok, dead, plain)}
            if states[ok]["status"] == "delivered" and states[dead]["status"] == "failed":
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
        assert {k: v for k, v in states[ok].items() if k != "last_attempt_at"} == {"status": "delivered", "attempts": 1}
        assert states[dead] == {"status": "failed", "attempts": 2, "last_attempt_at": states[dead]["last_attempt_at"]}
        assert states[ok]["last_attempt_at"] <= time.time() and states[dead]["last_attempt_at"] <= time.time()
        assert states[plain] is None  # no webhook asked for, none reported
