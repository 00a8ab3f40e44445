"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from typing import Iterator

import pytest


@pytest.fixture(params=["embedded", pytest.param("redis", marks=pytest.mark.redis)])
def store_args(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Extra command-line arguments that pick the store: none (embedded SQLite) or a fresh Redis prefix."""
    if request.param == "embedded":
        yield []
    else:
        yield ["--broker", request.getfixturevalue("redis_url")]
