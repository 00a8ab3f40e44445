"""Webhooks people can trust, through the real CLI: signed deliveries, no SSRF, strict URLs, bounded replies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.helpers import RECIPES, ROOT, Server, free_port, serve, wait_until
from tests.webhook_receiver import ALLOW_LOCAL, HUGE_REPLY_BYTES, Receiver

SECRET = "whsec_" + "c2lnbmVkIHdlYmhvb2tzIGZvciBmYXN0RGVwbG95IHRlc3Rz"  # 36 bytes


def _wait_for_log(server: Server, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not in the log:\n{server.log()}")
        time.sleep(0.05)
    return server.log()


def _api_rss_kib(server: Server) -> int:
    """Resident memory of the API server processes together (not the loops)."""
    total = 0
    for pid in server.children():
        if "_api" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"):
            continue
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    assert total, "no API server process found"
    return total


def test_every_delivery_is_signed_and_verifies_including_retries(store_args):
    # a failed attempt is counted once its --webhook-timeout has run out: a short one keeps retries quick
    env = {"FASTDEPLOY_WEBHOOK_SECRET": SECRET, "FASTDEPLOY_WEBHOOK_BACKOFF": "0.6", "FASTDEPLOY_WEBHOOK_TIMEOUT": "1"}
    with Receiver(secret=SECRET) as receiver, serve(RECIPES / "echo", args=[*store_args, *ALLOW_LOCAL], env=env) as server:
        first = server.post("/async", {"data": [1], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        flaky = server.post("/async", {"data": [2], "webhook": receiver.url + "/flaky?x=1"}).json()["unique_id"]
        receiver.wait_for("/ok", 1)
        receiver.wait_for("/flaky?x=1", 3)
        deliveries = receiver.delivered("/ok") + receiver.delivered("/flaky?x=1")
        assert [d.verified for d in deliveries] == [True] * 4
        [ok] = receiver.delivered("/ok")
        assert ok.headers["webhook-id"] == f"msg_{first}"
        retries = receiver.delivered("/flaky?x=1")
        assert {d.headers["webhook-id"] for d in retries} == {f"msg_{flaky}"}  # the same id on every retry
        stamps = [int(d.headers["webhook-timestamp"]) for d in retries]
        assert stamps == sorted(stamps) and stamps[-1] > stamps[0]  # one per attempt (0.6 s, then 1.2 s later)
        assert abs(stamps[-1] - time.time()) < 60
        tampered = ok.raw.replace(b'"prediction":[1]', b'"prediction":[7]')
        assert tampered != ok.raw
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(tampered, ok.headers)
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + "QUFB" * 8).verify(ok.raw, ok.headers)


def test_malformed_secret_stops_the_command_naming_the_option():
    state = tempfile.mkdtemp(prefix="fd-state-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({"FASTDEPLOY_STATE_DIR": state, "FASTDEPLOY_WEBHOOK_SECRET": "whsec_tooshort"})
    cmd = [sys.executable, "-m", "fastdeploy", "run", str(RECIPES / "echo"), "--host", "127.0.0.1", "--port", str(free_port())]
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("fastdeploy kept running with a malformed --webhook-secret")
    finally:
        subprocess.run(["rm", "-rf", state], check=False)
    assert proc.returncode == 2 and "--webhook-secret" in stderr and "tooshort" not in stderr, stderr


def test_metadata_addresses_and_bad_urls_are_refused_at_submit():
    with serve(RECIPES / "echo", args=ALLOW_LOCAL) as server:  # even where private addresses are allowed
        refused = {
            "http://169.254.169.254/latest/meta-data/": "link-local address 169.254.169.254",
            "http://[::ffff:169.254.169.254]/": "link-local address",
            "http://100.100.100.200/": "cloud metadata address",
            "http://user:hunter2@example.com/hook": "--webhook-secret",
            "http://example.com\r\nX-Evil: 1/": "control",
            "http://" + "h" * 300 + ".example/": "253",
            "http://example.com:99999/": "1 to 65535",
        }
        for url, reason in refused.items():
            answer = server.post("/async", {"data": [1], "webhook": url})
            assert answer.status_code == 400, (url, answer.text)
            assert answer.json()["success"] is False and reason in answer.json()["reason"], (url, answer.json())
        assert server.post("/async", {"data": [1], "webhook": "http://127.0.0.1:9/"}).status_code == 200
        assert "hunter2" not in server.log()


def test_by_default_a_name_that_resolves_to_loopback_is_refused_at_send_time():
    env = {"FASTDEPLOY_WEBHOOK_ATTEMPTS": "2", "FASTDEPLOY_WEBHOOK_BACKOFF": "0.1", "FASTDEPLOY_WEBHOOK_TIMEOUT": "1"}
    with Receiver() as receiver, serve(RECIPES / "echo", env=env) as server:
        webhook = f"http://localhost:{receiver.port}/ok?token=hunter2"
        answer = server.post("/async", {"data": ["x"], "webhook": webhook})
        assert answer.status_code == 200, answer.text  # a name: checked when it is resolved, at send time
        unique_id = answer.json()["unique_id"]
        assert server.wait_result(unique_id)["status"] == "done"
        log = _wait_for_log(server, f"webhook for {unique_id} to http://localhost:{receiver.port}/ok abandoned after "
                                    "2 attempts: refused: localhost resolves to loopback address")
        assert "--webhook-allow-private" in log and "hunter2" not in log
        webhook_state = server.post("/result", {"unique_id": unique_id}).json()["webhook"]
        assert (webhook_state["status"], webhook_state["attempts"]) == ("failed", 2)  # as any failure: retried
        assert "refused" not in str(webhook_state) and "loopback" not in str(webhook_state)
        assert receiver.posts == []


def test_by_default_private_literals_are_refused_at_submit_naming_the_option():
    with serve(RECIPES / "echo") as server:
        for url in ("http://127.0.0.1:9/", "http://[::1]:9/", "http://10.1.2.3/", "http://192.168.0.10/",
                    "http://[fec0::1]/", "http://[::10.1.2.3]/", "http://[64:ff9b::10.1.2.3]/"):
            answer = server.post("/async", {"data": [1], "webhook": url})
            assert answer.status_code == 400, (url, answer.text)
            reason = answer.json()["reason"]
            assert answer.json()["success"] is False and "--webhook-allow-private" in reason, (url, reason)
            assert "--webhook-hosts" in reason and "FASTDEPLOY_WEBHOOK_ALLOW_PRIVATE" in reason, reason


def test_result_tells_a_client_the_outcome_of_its_webhook_never_why_it_failed():
    """A client that points webhooks at a closed port, a silent one and a web server learns from
    /result only that each failed, after how many attempts and when: never what listens there."""
    env = {"FASTDEPLOY_WEBHOOK_ATTEMPTS": "2", "FASTDEPLOY_WEBHOOK_BACKOFF": "0.1", "FASTDEPLOY_WEBHOOK_TIMEOUT": "0.5"}
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL, env=env) as server:
        targets = {"closed": "http://127.0.0.1:9/closed", "silent": receiver.url + "/hang",
                   "http 500": receiver.url + "/flaky", "redirect": receiver.url + "/redirect", "ok": receiver.url + "/ok?token=hunter2"}
        started = time.time()
        ids = {kind: server.post("/async", {"data": [kind], "webhook": url}).json()["unique_id"]
               for kind, url in targets.items()}

        def settled() -> dict[str, dict]:  # {} until every webhook is delivered or given up
            found = {kind: server.post("/result", {"unique_id": i}).json().get("webhook") for kind, i in ids.items()}
            return found if all(w and w["status"] != "pending" for w in found.values()) else {}

        seen = wait_until(settled, timeout=30, what="every webhook settled")
        for kind, state in seen.items():
            assert set(state) == {"status", "attempts", "last_attempt_at"}, (kind, state)
            assert started <= state["last_attempt_at"] <= time.time(), (kind, state)
        assert {kind: (s["status"], s["attempts"]) for kind, s in seen.items()} == {
            "closed": ("failed", 2), "silent": ("failed", 2), "http 500": ("failed", 2), "redirect": ("failed", 2),
            "ok": ("delivered", 1)}
        log = server.log()  # the operator reads why, with the job's id and where
        assert f"webhook for {ids['closed']} to http://127.0.0.1:9/closed abandoned after 2 attempts: could not" in log
        assert f"webhook for {ids['silent']} to {receiver.url}/hang abandoned after 2 attempts: no answer" in log
        assert f"webhook for {ids['http 500']} to {receiver.url}/flaky abandoned after 2 attempts: HTTP 500" in log
        assert f"webhook for {ids['redirect']} to {receiver.url}/redirect abandoned after 2 attempts: HTTP 302" in log
        assert receiver.received("/ok?token=hunter2") and "hunter2" not in log  # a query may hold a token


def test_webhook_hosts_is_an_allow_list_checked_at_submit():
    with Receiver() as receiver, serve(RECIPES / "echo", args=["--webhook-hosts", "localhost"]) as server:
        refused = server.post("/async", {"data": [1], "webhook": f"http://127.0.0.1:{receiver.port}/ok"})
        assert refused.status_code == 400 and "--webhook-hosts" in refused.json()["reason"], refused.text
        allowed = server.post("/async", {"data": [2], "webhook": f"http://localhost:{receiver.port}/ok"})
        assert allowed.status_code == 200, allowed.text
        receiver.wait_for("/ok", 1)
        assert receiver.posts and len(receiver.posts) == 1


def test_redirects_are_not_followed():
    env = {"FASTDEPLOY_WEBHOOK_ATTEMPTS": "1"}
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL, env=env) as server:
        server.post("/async", {"data": [1], "webhook": receiver.url + "/redirect"})
        receiver.wait_for("/redirect", 1)
        _wait_for_log(server, "abandoned after 1 attempts: HTTP 302")
        assert receiver.received("/ok") == []


def test_a_huge_reply_is_not_read_and_counts_as_delivered():
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL) as server:
        server.post("/async", {"data": ["warm-up"], "webhook": receiver.url + "/ok"})
        receiver.wait_for("/ok", 1)
        time.sleep(0.5)
        before = _api_rss_kib(server)
        server.post("/async", {"data": ["big"], "webhook": receiver.url + "/huge"})
        receiver.wait_for("/huge", 1)
        time.sleep(2.0)  # time to read it all, had it been read
        growth_mib = (_api_rss_kib(server) - before) / 1024
        assert growth_mib < 20, f"API servers grew by {growth_mib:.0f} MiB"
        assert len(receiver.received("/huge")) == 1  # a 200: delivered, never retried
        assert receiver.huge_bytes_sent < HUGE_REPLY_BYTES // 2  # the sender hung up early
        assert "webhook for" not in server.log()
