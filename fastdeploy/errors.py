"""One error tree: each error knows the HTTP status and the reason a person can act on."""

from __future__ import annotations

from typing import Optional, Sequence


class FastDeployError(Exception):
    """Base of every error fastDeploy raises on purpose."""

    status: int = 500

    def __init__(self, reason: str, *, retry_after: Optional[float] = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """HTTP headers the answer to this error carries."""
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else {}


class SettingsError(FastDeployError):
    """An option has an invalid value; the message names the option."""


class RecipeError(FastDeployError):
    """A recipe folder is missing a file or defines something wrongly."""


class BadRequest(FastDeployError):
    status = 400


class Unauthorized(FastDeployError):
    """No API key, or one this service does not know."""

    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="fastdeploy"'}


class NotFound(FastDeployError):
    status = 404


class Conflict(FastDeployError):
    status = 409


class JobExists(Conflict):
    """A client-chosen unique_id names a job the store still holds (queued, running, or its result kept)."""

    def __init__(self, ids: Sequence[str]) -> None:
        shown = ", ".join(repr(i) for i in list(ids)[:3]) or "(none named)"
        super().__init__(
            f"unique_id {shown} is already in use (a job with that id is queued, running, or its result is kept "
            "until RESULT_TTL); send another id, or read that job with POST /result"
        )
        self.ids = tuple(ids)


class PayloadTooLarge(FastDeployError):
    status = 413


class TooManyRequests(FastDeployError):
    """One client (API key or address) has as many unfinished jobs as it may."""

    status = 429

    def __init__(self, reason: str, *, retry_after: Optional[float] = 2.0) -> None:
        super().__init__(reason, retry_after=retry_after)


def owner_limit_reason(count: int, limit: int) -> str:
    """What a client over the per-key bound is told, wherever the bound was checked."""
    return (f"you have {count} unfinished jobs, the most one client may have (QUEUE_LIMIT_PER_KEY={limit}); "
            "wait for some to finish, then retry")


class OwnerLimitReached(TooManyRequests):
    """The store refused jobs (``ids``) whose owner already had ``limit`` unfinished jobs: the per-key
    bound, checked in the same atomic write that would have queued them, so it holds across API servers."""

    def __init__(self, ids: Sequence[str], limit: int) -> None:
        super().__init__(owner_limit_reason(limit, limit))
        self.ids = tuple(ids)
        self.limit = limit


class Unavailable(FastDeployError):
    """Not ready, queue full or store unreachable: the client should retry later."""

    status = 503

    def __init__(self, reason: str, *, retry_after: Optional[float] = 1.0) -> None:
        super().__init__(reason, retry_after=retry_after)


class StoreUnavailable(Unavailable):
    """The store (SQLite file or Redis) cannot be reached right now."""
