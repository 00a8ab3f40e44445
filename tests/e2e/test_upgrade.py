"""An upgrade under queued jobs loses none (issue #25, point 4), through the real CLI: jobs that the
version before fair share left in its per-stage Redis queues are predicted once the new version
starts, and /result shows them done."""

from __future__ import annotations

import pytest

from tests.helpers import RECIPES, TEST_RECIPES, serve
from tests.old_redis_layout import write_legacy_chain_jobs, write_old_queue

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def test_jobs_queued_by_the_previous_version_are_drained_after_the_upgrade(redis_url):
    jobs = [(f"queued-before-upgrade-{n}", [n, f"x{n}"]) for n in range(5)]
    write_old_queue(redis_url, jobs)
    with serve(RECIPES / "echo", args=["--broker", redis_url]) as server:
        for job_id, inputs in jobs:
            body = server.wait_result(job_id, timeout=60)
            assert body["status"] == "done" and body["prediction"] == inputs, body
        assert server.post("/sync", {"data": [9]}).json()["prediction"] == [9]  # and it serves new ones


SECRET = "0123456789abcdef" * 4


def test_with_a_store_secret_jobs_of_the_previous_version_are_signed_again_and_predicted(redis_url):
    """Chains on a broker need a secret: their queued stage-0 records (unsigned then) and their stage-1
    payloads (signed without naming their job then) are signed for their jobs at start-up, once."""
    first = [(f"before-upgrade-{n}", [n]) for n in range(3)]
    middle = [(f"mid-chain-{n}", [(n, {2 * n})]) for n in range(3)]
    write_old_queue(redis_url, first)
    write_legacy_chain_jobs(redis_url, middle, SECRET)
    env = {"FASTDEPLOY_STORE_SECRET": SECRET, "BATCH_SIZE": "4"}
    with serve(TEST_RECIPES / "chain", args=["--broker", redis_url], env=env, ready_timeout=120) as server:
        expected = [(job_id, inputs[0]) for job_id, inputs in first] + [(f"mid-chain-{n}", n) for n in range(3)]
        for job_id, n in expected:
            body = server.wait_result(job_id, timeout=60)
            assert body["status"] == "done", body
            assert (body["prediction"][0]["input"], body["prediction"][0]["double"]) == (n, 2 * n)
        assert "signed 6 queued job(s) of an earlier fastDeploy version" in server.log(), server.log()[-2000:]
