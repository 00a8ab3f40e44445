"""Reports the environment its loop process was placed in, so tests can see each replica's device."""

import os
import time

SLEEP = float(os.environ.get("FD_TEST_SLEEP", "0.05"))


def predictor(inputs, batch_size=1):
    if inputs and inputs[0] != "warmup":
        time.sleep(SLEEP)  # keeps a loop busy, so concurrent requests reach the other loops
    env = {name: os.environ.get(name) for name in ("CUDA_VISIBLE_DEVICES", "FASTDEPLOY_DEVICE", "CUDA_DEVICE_ORDER")}
    return [{"pid": os.getpid(), **env} for _ in inputs]
