"""The `store` fixture: every contract test runs once per backend (embedded SQLite, Redis)."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from fastdeploy.store.base import Store

StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def open_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[StoreFactory]:
    """Opens handles on one fresh store; two handles act like two processes sharing it."""
    if request.param == "sqlite":
        from fastdeploy.store.sqlite import SQLiteStore

        state = tmp_path / "state"

        def factory() -> Store:
            return SQLiteStore(state)

    else:
        url = request.getfixturevalue("redis_url")  # unique prefix, cleaned afterwards
        from fastdeploy.store.redis import RedisStore

        def factory() -> Store:
            return RedisStore(url)

    opened: list[Store] = []

    def open_one() -> Store:
        store = factory()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> Store:
    return open_store()
