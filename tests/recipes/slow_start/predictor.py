"""Takes a while to load, so /health and /ready can be seen apart."""

import os
import time

time.sleep(float(os.environ.get("FD_TEST_LOAD_SECONDS", "3")))


def predictor(inputs, batch_size=1):
    return inputs
