"""The store secret: the key that signs what the stages of a chain hand each other.

Stages of a chain pass pickled objects through the store (``jobs.encode_stage_outputs``);
a loop unpickles a payload only when its HMAC verifies with this secret, so whoever can
write to the store (a Redis without a password, say) cannot make a worker run code.

- ``--store-secret`` / ``FASTDEPLOY_STORE_SECRET`` sets it; every process of a service
  needs the same one.
- With the embedded store and none given, the supervisor generates one (32 random bytes,
  hex) into ``STATE_DIR/store_secret`` (mode 0600) on first start and reuses it after.
- With ``--broker`` a chain needs one given: hosts share no folder to generate it in.
  One-stage recipes never unpickle anything and need none; given one on a broker, every job
  record is signed by the API server that accepted it (``for_jobs``), so a Redis writer
  without it cannot make a worker run inputs that no API server accepted for that id, owner
  and stage, nor read or delete files of another job (it can still replay a job as accepted).

The secret reaches the supervisor's children through their environment (``Settings.to_env``),
never their command line, and ``Settings`` leaves it out of its repr so it is not logged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import stat
from pathlib import Path

from fastdeploy.errors import SettingsError
from fastdeploy.recipe import Recipe
from fastdeploy.settings import Settings
from fastdeploy.state_folder import create_state_folder

log = logging.getLogger(__name__)

SECRET_FILE = "store_secret"
MIN_SECRET_LENGTH = 16
MISSING_REASON = (
    "a chain recipe on --broker needs --store-secret (or FASTDEPLOY_STORE_SECRET), the same on every host: "
    "the key that signs what its stages hand each other through Redis "
    "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
)


def resolve(settings: Settings, recipe: Recipe) -> Settings:
    """``settings`` with the store secret this service uses, checked once at start-up.

    Raises ``SettingsError`` (one line, naming the setting) when a chain on a broker has none.
    """
    if settings.store_secret:
        if len(settings.store_secret) < MIN_SECRET_LENGTH:
            raise SettingsError(f"--store-secret must be at least {MIN_SECRET_LENGTH} characters long")
        return settings
    if recipe.stages < 2:
        return settings  # nothing is ever unpickled: no secret needed
    if settings.broker:
        raise SettingsError(MISSING_REASON)
    return dataclasses.replace(settings, store_secret=load_or_create(settings.state_path))


@functools.lru_cache(maxsize=8)
def for_loop(settings: Settings) -> str:
    """The secret a prediction loop signs and checks with: the one given (the supervisor
    passes it on), else, on the embedded store, the state folder's own; else empty, which
    refuses every stage payload."""
    if settings.store_secret or settings.broker:
        return settings.store_secret
    return load_or_create(settings.state_path)


def for_jobs(settings: Settings) -> str:
    """The secret that signs every job record an API server writes (``jobs.sign_job``) and that a
    stage-0 loop checks: the given one on a broker, where other hosts can write to the store; none on
    the embedded store, whose writers can read the state folder's secret file beside it anyway."""
    return settings.store_secret if settings.broker else ""


def load_or_create(state_dir: Path) -> str:
    """The secret in ``state_dir/store_secret``, written there first (0600) if there is none.

    Safe when several processes start at once: the file appears whole (written aside,
    then linked or renamed into place) and the first one linked wins.
    """
    path = state_dir / SECRET_FILE
    if not path.exists():
        try:
            _create(path)
        except OSError as exc:
            raise SettingsError(f"cannot write the store secret {path}: {exc.strerror or exc}") from None
    return _read(path)


def _create(path: Path) -> None:
    create_state_folder(path.parent)
    secret = os.urandom(32).hex()
    aside = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(aside, path)
        log.info("generated a store secret in %s", path)
    except FileExistsError:
        pass  # another process of this service was first: use its secret
    except OSError:  # a file system without hard links
        if not path.exists():
            os.replace(aside, path)
    finally:
        try:
            os.unlink(aside)
        except FileNotFoundError:
            pass


def _read(path: Path) -> str:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("%s was readable by other users; it is now mode 0600", path)
        secret = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read the store secret {path}: {exc}") from None
    if secret:
        return secret
    raise SettingsError(f"the store secret {path} is empty: delete it to generate a new one, or give --store-secret")
