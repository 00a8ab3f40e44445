"""Sleeps per call and logs every call's inputs, so tests can see batching and order."""

import json
import os
import time

LOG = os.environ.get("FD_TEST_LOG")
SLEEP = float(os.environ.get("FD_TEST_SLEEP", "0.05"))


def predictor(inputs, batch_size=1):
    if inputs and inputs[0] != "warmup":
        time.sleep(SLEEP)
        if LOG:
            with open(LOG, "a") as log:
                log.write(json.dumps({"pid": os.getpid(), "inputs": inputs}) + "\n")
    return [{"echo": x, "pid": os.getpid()} for x in inputs]
