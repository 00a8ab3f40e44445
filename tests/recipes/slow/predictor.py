"""Sleeps per call and logs every call's inputs, so tests can see batching and order.

With FD_TEST_HOLD (a file's path), each call also waits until that file exists (at most HOLD_LIMIT
seconds): a test decides when jobs may finish, however slowly a loaded machine runs it."""

import json
import os
import time

LOG = os.environ.get("FD_TEST_LOG")
SLEEP = float(os.environ.get("FD_TEST_SLEEP", "0.05"))
HOLD = os.environ.get("FD_TEST_HOLD")
HOLD_LIMIT = 300


def predictor(inputs, batch_size=1):
    if inputs and inputs[0] != "warmup":
        time.sleep(SLEEP)
        _wait_for_release()
        if LOG:
            with open(LOG, "a") as log:
                log.write(json.dumps({"pid": os.getpid(), "inputs": inputs}) + "\n")
    return [{"echo": x, "pid": os.getpid()} for x in inputs]


def _wait_for_release():
    deadline = time.monotonic() + HOLD_LIMIT
    while HOLD and not os.path.exists(HOLD) and time.monotonic() < deadline:
        time.sleep(0.05)
