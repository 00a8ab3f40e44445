"""Progress lines of a long start-up step: every few seconds while it runs, none once it ended."""

from __future__ import annotations

import logging
import re
import time

import pytest

from fastdeploy import progress


def test_a_long_step_says_it_is_still_going_and_stops_saying_it_when_done(caplog: pytest.LogCaptureFixture) -> None:
    """At least one line while the step runs (a starved thread on a loaded machine may say only one
    where three were due), and none once it ended."""
    log = logging.getLogger("fastdeploy.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with progress.reported("warming up stage 0", log, every=0.1):
            time.sleep(0.35)
            deadline = time.monotonic() + 10
            while not caplog.records and time.monotonic() < deadline:  # the step goes on until it spoke
                time.sleep(0.05)
        said = [r.getMessage() for r in caplog.records]
        time.sleep(0.25)
    assert said and all(re.fullmatch(r"still warming up stage 0: \d+ s so far", m) for m in said), said
    assert [r.getMessage() for r in caplog.records] == said  # nothing after the step ended


def test_a_quick_step_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("fastdeploy.test_progress")
    with caplog.at_level(logging.INFO, logger=log.name), progress.reported("importing", log):
        pass
    assert not caplog.records
