"""W2 batch-cost: a fake model whose cost is 10 ms per call plus 1 ms per item.

At batch size 32 one call takes 42 ms, so a single predictor process can
never exceed 32 / 0.042 = 762 items/s.
"""
import time


def predictor(inputs, batch_size=1):
    time.sleep(0.010 + 0.001 * len(inputs))
    return list(inputs)
