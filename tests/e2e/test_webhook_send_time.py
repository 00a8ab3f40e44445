"""What the webhook sender checks and shows at send time, through the real CLI:
- a URL outside --webhook-hosts is never sent, even when the store says so (the store is not trusted);
- a client cannot time how its webhook failed: every failed attempt shows in /result when its
  --webhook-timeout has run out, whether the port was closed, silent or answered an error.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import pytest

from fastdeploy.store.redis import Keys, _split_url
from tests.helpers import RECIPES, TEST_RECIPES, Server, free_port, serve, wait_until
from tests.webhook_receiver import ALLOW_LOCAL, Receiver

UNFINISHED = ("queued", "processing")


def _rewrite_webhook(server: Server, store_args: list[str], unique_id: str, url: str) -> None:
    """Point an unfinished job's webhook at ``url`` straight in the store, as anyone who can write to
    Redis (or a job queued before the operator changed --webhook-hosts) could."""
    if not store_args:
        with sqlite3.connect(server.state_dir / "jobs.sqlite3", timeout=10) as db:
            changed = db.execute("UPDATE jobs SET webhook = ? WHERE id = ? AND status IN (?, ?)",
                                 (url, unique_id, *UNFINISHED)).rowcount
        db.close()
        assert changed == 1, "the job ended before its webhook could be rewritten"
        return
    import redis

    address, prefix = _split_url(store_args[1])
    client: Any = redis.Redis.from_url(address)
    try:
        key = Keys(prefix).job_prefix + unique_id
        assert client.hget(key, "status").decode() in UNFINISHED, "the job ended before its webhook was rewritten"
        client.hset(key, "webhook", url)
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_a_webhook_outside_webhook_hosts_is_never_sent_even_when_the_store_says_so(store_args):
    env = {"FD_TEST_SLEEP": "3", "FASTDEPLOY_WEBHOOK_ATTEMPTS": "1", "FASTDEPLOY_WEBHOOK_TIMEOUT": "1"}
    args = [*store_args, *ALLOW_LOCAL, "--webhook-hosts", "localhost"]  # private allowed: only the list stops it
    with Receiver() as receiver, serve(TEST_RECIPES / "slow", args=args, env=env) as server:
        refused = server.post("/async", {"data": ["x"], "webhook": receiver.url + "/unlisted"})
        assert refused.status_code == 400 and "--webhook-hosts" in refused.json()["reason"], refused.text
        listed = f"http://localhost:{receiver.port}/listed"
        unique_id = server.post("/async", {"data": ["slow"], "webhook": listed}).json()["unique_id"]
        _rewrite_webhook(server, store_args, unique_id, receiver.url + "/unlisted")  # while it is predicted (3 s)
        assert server.wait_result(unique_id)["status"] == "done"

        def settled() -> dict:
            state = server.post("/result", {"unique_id": unique_id}).json()["webhook"]
            return state if state["status"] != "pending" else {}

        state = wait_until(settled, 30, "the webhook given up")
        assert (state["status"], state["attempts"]) == ("failed", 1), state
        assert f"webhook for {unique_id} to {receiver.url}/unlisted abandoned after 1 attempts: " \
               "refused: 127.0.0.1 is not one of the --webhook-hosts" in server.log(), server.log()[-3000:]
        assert receiver.posts == []  # never attempted: not the rewritten URL, nor the one submitted


def test_a_client_cannot_time_how_its_webhook_failed():
    """A closed port fails at once, a silent one after --webhook-timeout, a web server answering 500 in
    between: in /result each failed attempt shows (counted, its time, its retry) when the timeout ran out."""
    timeout = 3.0
    env = {"FASTDEPLOY_WEBHOOK_ATTEMPTS": "2", "FASTDEPLOY_WEBHOOK_BACKOFF": "0.1",
           "FASTDEPLOY_WEBHOOK_TIMEOUT": str(timeout)}
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL, env=env) as server:
        targets = {"closed": f"http://127.0.0.1:{free_port()}/closed", "silent": receiver.url + "/hang",
                   "http 500": receiver.url + "/flaky", "ok": receiver.url + "/ok"}
        submitted = time.time()
        ids = {kind: server.post("/async", {"data": [kind], "webhook": url}).json()["unique_id"]
               for kind, url in targets.items()}
        first_counted: dict[str, float] = {}  # when a client polling /result first saw an attempt counted
        states: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        while len(states) < len(ids):
            assert time.monotonic() < deadline, (first_counted, states)
            for kind, unique_id in ids.items():
                state = server.post("/result", {"unique_id": unique_id}).json().get("webhook") or {}
                if state.get("attempts") and kind not in first_counted:
                    first_counted[kind] = time.time()
                if state.get("status") in ("delivered", "failed"):
                    states[kind] = state
            time.sleep(0.05)

    assert {kind: (s["status"], s["attempts"]) for kind, s in states.items()} == {
        "closed": ("failed", 2), "silent": ("failed", 2), "http 500": ("failed", 2), "ok": ("delivered", 1)}
    failed = [kind for kind in ids if kind != "ok"]
    for kind in failed:  # no attempt started before the job was submitted, each is shown a timeout after
        assert first_counted[kind] - submitted >= timeout - 0.1, (kind, first_counted, submitted)
        assert states[kind]["last_attempt_at"] - submitted >= 2 * timeout, (kind, states, submitted)
    ends = [states[kind]["last_attempt_at"] for kind in failed]
    assert max(ends) - min(ends) < timeout / 2, states  # a closed port and a silent one look the same
    assert first_counted["ok"] - submitted < timeout  # a delivery is shown as soon as it is made
