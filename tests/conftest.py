"""Fixtures shared by every test folder."""

# Redis for the store contract suite and the scale-out tests: redis_base_url, redis_url.
from tests.redis_server import redis_base_url, redis_url  # noqa: F401
