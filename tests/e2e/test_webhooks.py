"""Webhooks: delivered with the result, retried with growing delays, never holding anything up."""

from __future__ import annotations

import time

from tests.helpers import RECIPES, TEST_RECIPES, serve, wait_until
from tests.webhook_receiver import ALLOW_LOCAL, Receiver


def test_webhook_gets_the_result_once():
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL) as server:
        unique_id = server.post("/async", {"data": [1, "x"], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        (body,) = receiver.wait_for("/ok", 1)
        assert body == {"unique_id": unique_id, "status": "done", "success": True, "prediction": [1, "x"]}
        (delivery,) = receiver.delivered("/ok")
        assert not {"webhook-id", "webhook-timestamp", "webhook-signature"} & {h.lower() for h in delivery.headers}
        time.sleep(1.0)
        assert len(receiver.received("/ok")) == 1


def test_failed_job_webhook_carries_the_reason():
    with Receiver() as receiver, serve(TEST_RECIPES / "faulty", args=ALLOW_LOCAL) as server:
        unique_id = server.post("/async", {"data": ["boom"], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        (body,) = receiver.wait_for("/ok", 1)
        assert body["unique_id"] == unique_id and body["status"] == "failed" and body["success"] is False
        assert "ValueError" in body["reason"]


def test_failing_receiver_is_retried_with_growing_delays():
    env = {"FASTDEPLOY_WEBHOOK_BACKOFF": "0.3", "FASTDEPLOY_WEBHOOK_TIMEOUT": "1"}  # a failure counts after 1 s
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL, env=env) as server:
        server.post("/async", {"data": [5], "webhook": receiver.url + "/flaky"})
        receiver.wait_for("/flaky", 3)
        times = [t for path, _, t in receiver.posts if path == "/flaky"]
        first_gap, second_gap = times[1] - times[0], times[2] - times[1]
        assert first_gap >= 1.25 and second_gap >= 1.55, (first_gap, second_gap)  # the timeout, then 0.3 s, 0.6 s
        time.sleep(1.5)
        assert len(receiver.received("/flaky")) == 3  # delivered on the third try, then never again


def test_hanging_and_dead_receivers_hold_up_nothing():
    env = {"FASTDEPLOY_WEBHOOK_TIMEOUT": "1", "FASTDEPLOY_WEBHOOK_BACKOFF": "0.2", "FASTDEPLOY_WEBHOOK_ATTEMPTS": "2"}
    with Receiver() as receiver, serve(RECIPES / "echo", args=ALLOW_LOCAL, env=env) as server:
        for i in range(5):
            server.post("/async", {"data": [i], "webhook": receiver.url + "/hang"})
            server.post("/async", {"data": [i], "webhook": "http://127.0.0.1:9/refused"})
        started = time.monotonic()
        for i in range(20):
            assert server.post("/sync", {"data": [i]}).json()["prediction"] == [i]
        assert time.monotonic() - started < 10
        unique_id = server.post("/async", {"data": ["last"], "webhook": receiver.url + "/ok"}).json()["unique_id"]
        (body,) = receiver.wait_for("/ok", 1, timeout=10)
        assert body["unique_id"] == unique_id
        receiver.wait_for("/hang", 10, timeout=30)  # two attempts each, then abandoned
        # given up once the second attempt's time has run out (a failure is counted then, however quick)
        wait_until(lambda: "abandoned after 2 attempts" in server.log(), 10, "the webhooks given up")
