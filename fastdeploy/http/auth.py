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
from pathlib import Path
from typing import Optional

from starlette.types import Scope

from fastdeploy.errors import SettingsError, Unauthorized

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16
MISSING = "this service needs an API key: send Authorization: Bearer KEY or X-API-Key: KEY"
WRONG = "the API key is not valid for this service"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


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
    """The keys that may call this service (re-read from the file by ``reload``)."""

    def __init__(self, inline: str = "", path: str = "") -> None:
        self._inline = [k.strip() for k in inline.split(",") if k.strip()]
        if inline.strip() and not self._inline:
            raise SettingsError(f"--api-keys holds no key ({inline!r} after splitting on commas); refusing to run open")
        self._path = path
        self.enabled = bool(self._inline or path)
        self._digests = self._load()

    def _load(self) -> list[bytes]:
        keys = self._inline + (read_keys_file(self._path) if self._path else [])
        if self.enabled and not keys:
            raise SettingsError("API keys are required but none is configured (--api-keys / --api-keys-file)")
        if any(len(key) < MIN_KEY_LENGTH for key in keys):
            log.warning("an API key shorter than %d characters can be guessed; use long random keys "
                        "(python -c 'import secrets; print(secrets.token_urlsafe(32))')", MIN_KEY_LENGTH)
        return [_digest(key) for key in keys]

    def reload(self) -> None:
        """Re-read the keys file (SIGHUP); on a bad file keep the keys in use and say why."""
        try:
            self._digests = self._load()
            log.info("API keys reloaded: %d key(s)", len(self._digests))
        except SettingsError as exc:
            log.error("keeping the API keys in use: %s", exc.reason)

    def owner(self, scope: Scope) -> str:
        """The owner of a request: its key's digest (checked), or without keys its address."""
        if not self.enabled:
            client = scope.get("client")
            return f"addr:{client[0]}" if client else "addr:unknown"
        key = _presented_key(scope)
        if key is None:
            raise Unauthorized(MISSING)
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
