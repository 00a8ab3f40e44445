"""Who is calling: API keys, checked in constant time, and the owner a job is filed under.

With keys configured (``--api-keys``, ``--api-keys-file``), a request must carry one
(``Authorization: Bearer KEY`` or ``X-API-Key: KEY``); its owner is a digest of the key,
so keys themselves never reach the store or the logs. Without keys, every caller is
let in and its owner is its address, which still gives clients their own lane in the
fair share (but not isolation: anyone may read any job whose id they know, as in the
original API).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from pathlib import Path
from typing import Optional

from starlette.types import Scope

from fastdeploy.errors import SettingsError, Unauthorized

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
MISSING = "this service needs an API key: send Authorization: Bearer KEY or X-API-Key: KEY"
WRONG = "the API key is not valid for this service"
NONE_ACCEPTED = "this service accepts no API key at the moment (its operator has removed them all); ask the operator"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _digests(keys: list[str]) -> list[bytes]:
    """The digests kept in memory instead of the keys (a short key is warned about: it can be guessed)."""
    if any(len(key) < MIN_KEY_LENGTH for key in keys):
        log.warning("an API key shorter than %d characters can be guessed; use long random keys "
                    "(python -c 'import secrets; print(secrets.token_urlsafe(32))')", MIN_KEY_LENGTH)
    return [_digest(key) for key in keys]


def read_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--api-keys-file: cannot read {path}: {exc}") from None
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keys.append(line.split(" #", 1)[0].split("\t#", 1)[0].strip())  # a comment needs a space before it
    return [key for key in keys if key]


class ApiKeys:
    """The keys that may call this service, re-read from the file on SIGHUP (``reload``).

    After a reload the keys in force are exactly those of --api-keys and those the file holds
    now: a file emptied, deleted or unreadable holds none, so removing the last key revokes it
    (then every request that needs a key is refused, unless --api-keys holds some). Keeping the
    old keys instead would leave a key the operator removed working, with nothing to show it.
    Each such reload is logged at warning and shown on the status page (``warnings``)."""

    def __init__(self, inline: str = "", path: str = "", *, strict: bool = True) -> None:
        """``strict``: a keys file that gives no key stops the command (SettingsError), as at start-up;
        an API server the supervisor starts later (after a revocation) starts with none in force instead."""
        self._inline = [k.strip() for k in inline.split(",") if k.strip()]
        if inline.strip() and not self._inline:
            raise SettingsError(f"--api-keys holds no key ({inline!r} after splitting on commas); refusing to run open")
        self._path = path
        self.enabled = bool(self._inline or path)
        self.revoked: Optional[str] = None  # why the file's keys are refused since the last reload, if they are
        self._digests: list[bytes] = []
        if strict:
            keys = self._inline + (read_keys_file(path) if path else [])
            if self.enabled and not keys:
                raise SettingsError("API keys are required but none is configured (--api-keys / --api-keys-file)")
            self._digests = _digests(keys)
        else:
            self._refresh()

    def reload(self) -> None:
        """SIGHUP: put in force the keys the file holds now."""
        self._refresh()
        if self.revoked is None:
            log.info("API keys reloaded: %d key(s)", len(self._digests))

    def warnings(self) -> list[str]:
        """What the status page should tell every key holder about the keys (nothing while all is well)."""
        return [self.revoked] if self.revoked else []

    def _refresh(self) -> None:
        """The --api-keys keys and the file's as it is now (none, said at warning, when it gives none)."""
        trouble = detail = ""
        try:
            found = read_keys_file(self._path) if self._path else []
            if self._path and not found:
                trouble, detail = "holds no key", self._path
        except SettingsError as exc:
            found, detail = [], exc.reason
            trouble = "cannot be read" if os.path.exists(self._path) else "is missing"  # never raises
        self._digests = _digests(self._inline + found)
        self.revoked = self._revocation(trouble, detail) if trouble else None

    def _revocation(self, trouble: str, detail: str) -> str:
        """Log that the file's keys are refused now; return what the status page says of it (no path)."""
        left = "only the --api-keys keys are accepted" if self._inline else "every request that needs a key gets 401"
        log.warning("the API keys file %s (%s): every key it held is refused now; %s. Put keys in it and send "
                    "SIGHUP to accept them again", trouble, detail, left)
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        still = "; the --api-keys keys are still accepted" if self._inline else ""
        return f"the API keys file {trouble} (read at {when}): every key it held is refused{still}"

    def owner(self, scope: Scope) -> str:
        """The owner of a request: its key's digest (checked), or without keys its address."""
        if not self.enabled:
            client = scope.get("client")
            return f"addr:{client[0]}" if client else "addr:unknown"
        key = _presented_key(scope)
        if key is None:
            raise Unauthorized(MISSING)
        if not self._digests:  # every key revoked (see the class): say so rather than "not valid"
            raise Unauthorized(NONE_ACCEPTED)
        presented = _digest(key)
        found = False
        for known in self._digests:  # every key compared, whichever matches: no timing tells which
            found |= hmac.compare_digest(presented, known)
        if not found:
            raise Unauthorized(WRONG)
        return "key:" + presented.hex()[:32]


def _presented_key(scope: Scope) -> Optional[str]:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.decode("latin-1").strip()
    return None
