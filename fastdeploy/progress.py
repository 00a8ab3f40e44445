"""Progress lines for a step that may take minutes (a predictor's import, its warm-up), so an
operator watching the log sees it is alive: a silent start-up reads as a hung one.

The lines come from a thread of its own, because the step holds the thread it runs on (an import
runs to its end); a step that holds the GIL the whole time (one long C call) delays them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator

PROGRESS_SECONDS = 5.0  # how often a long step says it is still going


@contextlib.contextmanager
def reported(what: str, log: logging.Logger, every: float = PROGRESS_SECONDS) -> Iterator[None]:
    """Log ``still WHAT: N s so far`` every ``every`` seconds until the block ends."""
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        while not done.wait(every):
            log.info("still %s: %.0f s so far", what, time.monotonic() - started)

    reporter = threading.Thread(target=report, name="progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()
