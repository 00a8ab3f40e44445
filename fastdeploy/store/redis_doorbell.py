"""The Redis store's doorbell: a token list per stage for loops, pub/sub for API servers.

The store's Lua scripts ring: every submit or stage move pushes a token on the stage's
short list (idle loops ``BLPOP`` it: one token wakes one loop), and every finish
publishes the outcome on the channel of the API server that waits for it (its
``address``), or the bare ids on the channel every API server hears. A Redis outage
turns every wait into a sleep; the callers' polls of the store carry on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Optional

import msgpack
import redis

from fastdeploy.jobs import ResultNews
from fastdeploy.store.doorbell import Doorbell
from fastdeploy.store.news import read_news
from fastdeploy.store.redis import MAX_BELL_WAIT, SOCKET_TIMEOUT, connect

log = logging.getLogger(__name__)


class RedisDoorbell(Doorbell):
    """Rings carried by Redis, shared by every process that uses the same URL and prefix."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self._redis, self.keys, self._server = connect(url)
        self._pubsub: Optional[Any] = None
        self._pubsub_lock = threading.Lock()
        self._want_results = False
        self._origin = os.urandom(8).hex()  # names this process's own results channel

    @property
    def address(self) -> Optional[str]:
        return self._origin if self._want_results else None

    # -- loop side ------------------------------------------------------------
    def wait_for_jobs(self, stage: int, timeout: float) -> None:
        """BLPOP one token of the stage's list; during a Redis outage just sleep (the caller retries)."""
        timeout = min(max(timeout, 0.0), MAX_BELL_WAIT)
        started = time.monotonic()
        try:
            if timeout < 0.01:
                self._redis.lpop(self.keys.bell(stage))
            else:
                self._redis.blpop([self.keys.bell(stage)], timeout=timeout)
        except (redis.RedisError, OSError) as exc:
            log.debug("jobs bell at %s: %s", self._server, exc)
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))

    # -- API side -------------------------------------------------------------
    def listen_for_results(self) -> None:
        """Subscribe now if Redis answers, else on the first wait."""
        self._want_results = True
        try:
            self._subscribe()
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot subscribe to results at %s yet (will retry): %s", self._server, exc)
            self._drop_pubsub()

    def _subscribe(self) -> Any:
        with self._pubsub_lock:
            if self._pubsub is not None:
                return self._pubsub
            pubsub = self._redis.pubsub(ignore_subscribe_messages=False)
            try:
                channels = (self.keys.results, self.keys.results_for(self._origin))
                pubsub.subscribe(*channels)
                # Wait for the confirmations, so rings published after this returns reach us.
                confirmed = 0
                deadline = time.monotonic() + SOCKET_TIMEOUT
                while confirmed < len(channels) and time.monotonic() < deadline:
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "subscribe":
                        confirmed += 1
            except BaseException:
                pubsub.close()
                raise
            self._pubsub = pubsub
            return pubsub

    def _drop_pubsub(self) -> None:
        with self._pubsub_lock:
            pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except (redis.RedisError, OSError):  # already broken; nothing to release
                pass

    def wait_for_results(self, timeout: float) -> list[ResultNews]:
        """News from the shared results channel (ids) and this process's own (outcomes of the
        jobs it waits for); a Redis outage just makes this a sleep (the poll covers it)."""
        if not self._want_results:
            time.sleep(max(timeout, 0.0))
            return []
        started = time.monotonic()
        heard: list[ResultNews] = []
        try:
            pubsub = self._subscribe()
            message = pubsub.get_message(timeout=min(max(timeout, 0.0), MAX_BELL_WAIT))
            while message is not None:
                if message.get("type") == "message":
                    heard.extend(_read(message["data"]))
                message = pubsub.get_message(timeout=0.0)
        except (redis.RedisError, OSError, ValueError) as exc:
            log.debug("results channel at %s: %s", self._server, exc)
            self._drop_pubsub()
            time.sleep(max(0.0, timeout - (time.monotonic() - started)))
        return heard

    def close(self) -> None:
        super().close()
        self._want_results = False
        self._drop_pubsub()
        try:
            self._redis.close()
        except (redis.RedisError, OSError):  # closing a broken pool must not fail a shutdown
            pass


def _read(data: Any) -> list[ResultNews]:
    try:
        return read_news(data if isinstance(data, bytes) else str(data).encode())
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # the poll covers it
        log.warning("ignoring an unreadable result message: %s", exc)
        return []
