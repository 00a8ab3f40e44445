"""Job stores and their doorbells: the contracts in base.py and doorbell.py, the embedded
SQLite store with its local doorbell, and the Redis store with its Redis doorbell."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastdeploy.errors import SettingsError, StoreUnavailable
from fastdeploy.store.base import Store, WebhookDelivery
from fastdeploy.store.doorbell import Doorbell

__all__ = ["Backend", "Doorbell", "Store", "WebhookDelivery", "open_backend", "open_store"]


@dataclass
class Backend:
    """A store and the doorbell that goes with it, opened and closed together."""

    store: Store
    doorbell: Doorbell

    def close(self) -> None:
        self.doorbell.close()
        self.store.close()


def _check_broker(broker: str) -> None:
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        raise SettingsError(f"--broker must be a redis://HOST:PORT/DB URL, got {broker!r}")


def open_store(broker: str, state_dir: Optional[Path] = None) -> Store:
    """The store the settings ask for: Redis when a broker URL is given, else SQLite.

    Backends are imported here, on demand, so the SQLite path never needs ``redis``.
    """
    if broker:
        _check_broker(broker)
        from fastdeploy.store.redis import RedisStore

        return RedisStore(broker)
    from fastdeploy.store.sqlite import SQLiteStore

    if state_dir is None:
        raise SettingsError("the embedded store needs a state folder (--state-dir)")
    return SQLiteStore(state_dir)


def open_doorbell(broker: str, state_dir: Optional[Path] = None, spin_seconds: float = 0.0) -> Doorbell:
    """The doorbell of the store ``open_store`` opens for the same arguments.

    ``spin_seconds``: how long a local doorbell may look for an expected ring before it
    sleeps (see ``local_doorbell``); network doorbells ignore it.
    """
    if broker:
        _check_broker(broker)
        from fastdeploy.store.redis_doorbell import RedisDoorbell

        return RedisDoorbell(broker)
    from fastdeploy.store.local_doorbell import LocalDoorbell, bell_folder

    if state_dir is None:
        raise SettingsError("the embedded store needs a state folder (--state-dir)")
    try:
        return LocalDoorbell(bell_folder(state_dir), spin_seconds)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the doorbell folder in {state_dir}: {exc}") from None


def open_backend(broker: str, state_dir: Optional[Path] = None, spin_seconds: float = 0.0) -> Backend:
    """The store and its doorbell, for a process that waits for rings (API servers, loops)."""
    store = open_store(broker, state_dir)
    try:
        return Backend(store, open_doorbell(broker, state_dir, spin_seconds))
    except BaseException:
        store.close()
        raise
