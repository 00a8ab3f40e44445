"""For the scale-out tests: sleeps per batch and logs when each batch starts and ends, with its pid.

FD_TEST_LOG: a JSON-lines file every call appends {"pid", "phase": "start"|"end", "inputs"} to.
FD_TEST_SLEEP: seconds each batch of real inputs takes (warm-up calls on "warmup" never sleep).
"""

import json
import os
import time

LOG = os.environ.get("FD_TEST_LOG")
SLEEP = float(os.environ.get("FD_TEST_SLEEP", "0.02"))


def _log(phase, inputs):
    if LOG:
        with open(LOG, "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "phase": phase, "inputs": inputs}) + "\n")


def predictor(inputs, batch_size=1):
    if any(x != "warmup" for x in inputs):
        _log("start", inputs)
        time.sleep(SLEEP)
        _log("end", inputs)
    return [{"echo": x, "pid": os.getpid()} for x in inputs]
