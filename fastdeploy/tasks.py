"""The top of every long-lived background task of an API server process.

A task that ends by surprise ends silently (nobody awaits it until shutdown), and with it
readiness, maintenance or the fallback poll for lost rings. So each runs its steps under
this one guard: an unexpected error is logged with its traceback and the next step runs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


async def keep_running(what: str, step: Callable[[], Awaitable[float]]) -> None:
    """Run ``step()`` again and again until cancelled, sleeping the seconds it returns."""
    while True:
        try:
            pause = await step()
        except Exception:  # a task's top: nothing above it would see the error
            log.exception("%s failed; carrying on", what)
            pause = 1.0
        await asyncio.sleep(pause)
