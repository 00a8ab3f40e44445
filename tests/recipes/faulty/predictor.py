"""Misbehaves on purpose, keyed by the input, so tests can check that only that request fails."""

import os
from pathlib import Path

import numpy as np


class Opaque:
    pass


def _one(x):
    if x == "boom":
        raise ValueError("cannot predict 'boom'")
    if x == "numpy":
        return {"scalar": np.float32(1.5), "array": np.arange(3), "int": np.int64(7)}
    if x == "object":
        return Opaque()
    return x


def predictor(inputs, batch_size=1):
    marker = os.environ.get("FD_TEST_CRASH_MARKER")
    if marker and "crash" in inputs and not Path(marker).exists():
        Path(marker).write_text("crashed once")
        os._exit(3)  # the loop process dies in the middle of a batch
    if "short" in inputs:
        return [_one(x) for x in inputs][:-1]
    return [_one(x) for x in inputs]
