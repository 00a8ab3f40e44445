"""Job stores: the contract in base.py, the embedded SQLite store and the Redis store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fastdeploy.errors import SettingsError
from fastdeploy.store.base import Store, WebhookDelivery

__all__ = ["Store", "WebhookDelivery", "open_store"]


def open_store(broker: str, state_dir: Optional[Path] = None) -> Store:
    """The store the settings ask for: Redis when a broker URL is given, else SQLite.

    Backends are imported here, on demand, so the SQLite path never needs ``redis``.
    """
    if broker:
        if not broker.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(f"--broker must be a redis://HOST:PORT/DB URL, got {broker!r}")
        from fastdeploy.store.redis import RedisStore

        return RedisStore(broker)
    from fastdeploy.store.sqlite import SQLiteStore

    if state_dir is None:
        raise SettingsError("the embedded store needs a state folder (--state-dir)")
    return SQLiteStore(state_dir)
