"""Job stores: the contract in base.py, the embedded SQLite store and the Redis store."""

from fastdeploy.store.base import Store, WebhookDelivery, open_store

__all__ = ["Store", "WebhookDelivery", "open_store"]
