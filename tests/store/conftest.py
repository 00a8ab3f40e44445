"""Every contract test runs once per backend (embedded SQLite, Redis).

``open_store()`` and ``open_doorbell()`` open handles on one fresh store and its
doorbell; two handles act like two processes sharing it.
"""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import pytest

from fastdeploy.store import open_doorbell as open_backend_doorbell
from fastdeploy.store import open_store as open_backend_store
from fastdeploy.store.base import Store
from fastdeploy.store.doorbell import Doorbell

T = TypeVar("T")
StoreFactory = Callable[[], Store]
DoorbellFactory = Callable[[], Doorbell]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def backend_args(request: pytest.FixtureRequest, tmp_path) -> tuple[str, object]:
    """(broker, state folder) naming one fresh store of the backend under test."""
    if request.param == "sqlite":
        return "", tmp_path / "state"
    return request.getfixturevalue("redis_url"), None  # unique prefix, cleaned afterwards


def _opener(open_one: Callable[..., T], args: tuple[str, object]) -> Iterator[Callable[[], T]]:
    """A factory of handles opened with ``args``, all closed at the end of the test."""
    opened: list = []

    def factory() -> T:
        handle = open_one(*args)
        opened.append(handle)
        return handle

    yield factory
    for handle in opened:
        handle.close()


@pytest.fixture
def open_store(backend_args) -> Iterator[StoreFactory]:
    yield from _opener(open_backend_store, backend_args)


@pytest.fixture
def open_doorbell(backend_args) -> Iterator[DoorbellFactory]:
    yield from _opener(open_backend_doorbell, backend_args)


@pytest.fixture
def store(open_store: StoreFactory) -> Store:
    return open_store()
