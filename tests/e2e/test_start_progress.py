"""A slow start-up, through the real CLI: the log says the import is still going every few seconds,
and gives the address (marked not ready yet) as soon as the port answers, not only once ready."""

from __future__ import annotations

import requests

from tests.helpers import TEST_RECIPES, serve, wait_until


def test_a_slow_import_shows_progress_and_the_address_before_the_stage_is_ready():
    with serve(TEST_RECIPES / "slow_start", env={"FD_TEST_LOAD_SECONDS": "7"}, ready=False) as server:
        early = f"API:         {server.url}  (not ready yet"
        # generous: it covers the CLI's whole start-up on a loaded machine; whenever it comes, it
        # must come before the stage is ready (asserted on the text it returns)
        text = wait_until(lambda: server.log() if early in server.log() else "", 60, "the address, not ready yet")
        assert "stage 0 ready in" not in text and "'slow_start' ready in" not in text
        assert requests.get(server.url + "/health", timeout=10).status_code == 200  # what the line promises
        assert requests.get(server.url + "/ready", timeout=10).status_code == 503
        text = wait_until(lambda: server.log() if "still importing" in server.log() else "", 30, "a progress line")
        assert "imported the predictor" not in text  # said while the import runs
        assert "still importing the predictor of stage 0 (predictor.py): 5 s so far" in text, text
        server.wait_ready()
        text = server.log()
        steps = ["importing the predictor of stage 0", "still importing the predictor of stage 0",
                 "imported the predictor in ", "stage 0 ready in ", "'slow_start' ready in ",
                 f"API:         {server.url}  (POST /sync"]
        at = 0
        for step in steps:
            found = text.find(step, at)
            assert found >= 0, f"{step!r} missing after position {at}:\n{text}"
            at = found + len(step)
        assert text.index(early) < text.index("stage 0 ready in ")
        assert 1 <= text.count("still importing") <= 2  # every 5 s, not on every tick
