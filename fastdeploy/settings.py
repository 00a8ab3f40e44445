"""One typed, frozen Settings object, read from flags and the environment in one place.

Every option is declared once in ``OPTIONS``: its flag, its environment names (the
original fastDeploy names such as ``TIMEOUT`` keep working) and its default. Precedence:
command-line flag, then ``FASTDEPLOY_<NAME>``, then the original name, then the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from fastdeploy.errors import SettingsError


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


@dataclass(frozen=True)
class Option:
    """How one setting is named, typed and documented."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    legacy_env: tuple[str, ...] = ()
    minimum: Optional[float] = None

    @property
    def env(self) -> str:
        return "FASTDEPLOY_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "0.0.0.0", "address the HTTP server listens on"),
    Option("port", int, 8080, "port the HTTP server listens on", ("PORT",), 0),
    Option("state_dir", str, "", "folder for the embedded store (default RECIPE/.fastdeploy)"),
    Option("broker", str, "", "redis://HOST:PORT/DB to share one queue between hosts; empty = embedded SQLite store"),
    Option("timeout", float, 480.0, "seconds a /sync request may wait before 504", ("TIMEOUT",), 0.001),
    Option("max_per_client_batch", int, 0, "most inputs in one request (0 = no limit)", ("MAX_PER_CLIENT_BATCH",), 0),
    Option("only_async", _parse_bool, False, "refuse /sync (clients must use /async)", ("ONLY_ASYNC",)),
    Option("batch_size", int, 0, "fix the batch size instead of measuring it at start-up (0 = measure)", ("BATCH_SIZE",), 0),
    Option("max_batch_size", int, 256, "largest batch size the start-up search tries", (), 1),
    Option("max_wait", float, 0.5, "how long a loop waits for a fuller batch, as a multiple of the time per example (only under load)", ("MAX_WAIT",), 0),
    Option("workers", int, 0, "HTTP server processes sharing the port (0 = one per CPU core, at most 4)", ("WORKERS",), 0),
    Option("replicas", int, 1, "prediction loop processes per stage", (), 1),
    Option("threads", int, 0, "torch / ONNX Runtime / BLAS threads per loop (0 = cores / loop processes)", (), 0),
    Option("spin_us", float, 1000.0, "microseconds a loop or API server polls for the next ring before sleeping, only while a lone client sends request after request (0 = always sleep)", (), 0),
    Option("result_ttl", float, 3600.0, "seconds a finished result stays readable", ("RESULT_TTL",), 1),
    Option("max_body_mb", float, 100.0, "largest request body in MiB (413 above)", (), 0.001),
    Option("queue_limit", int, 100000, "most unfinished jobs before /sync and /async answer 503", (), 1),
    Option("lease_seconds", float, 30.0, "how long a claimed job stays with a loop that stops heartbeating", (), 0.1),
    Option("heartbeat_seconds", float, 1.0, "how often loops report they are alive", (), 0.01),
    Option("webhook_attempts", int, 8, "deliveries tried per webhook before giving up", (), 1),
    Option("webhook_timeout", float, 10.0, "seconds a webhook receiver has to answer", (), 0.01),
    Option("webhook_backoff", float, 1.0, "first retry delay in seconds; doubles each attempt", (), 0),
    Option("webhook_hosts", str, "", "comma-separated hosts webhooks may target (empty = any)"),
    Option("log_level", str, "info", "debug, info, warning or error"),
)

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Everything a fastDeploy process needs to know, resolved once at start-up."""

    recipe_dir: Path
    host: str = "0.0.0.0"
    port: int = 8080
    state_dir: str = ""
    broker: str = ""
    timeout: float = 480.0
    max_per_client_batch: int = 0
    only_async: bool = False
    batch_size: int = 0
    max_batch_size: int = 256
    max_wait: float = 0.5
    workers: int = 0
    replicas: int = 1
    threads: int = 0
    spin_us: float = 1000.0
    result_ttl: float = 3600.0
    max_body_mb: float = 100.0
    queue_limit: int = 100000
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 1.0
    webhook_attempts: int = 8
    webhook_timeout: float = 10.0
    webhook_backoff: float = 1.0
    webhook_hosts: str = ""
    log_level: str = "info"

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else self.recipe_dir / ".fastdeploy"

    @property
    def api_processes(self) -> int:
        """How many HTTP server processes to run: WORKERS, or one per core (at most 4)."""
        return self.workers or max(1, min(4, os.cpu_count() or 1))

    @property
    def spin_seconds(self) -> float:
        return self.spin_us / 1_000_000

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def allowed_webhook_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.webhook_hosts.split(",") if h.strip())

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process resolve these same settings."""
        env = {}
        for option in OPTIONS:
            value = getattr(self, option.name)
            env[option.env] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


def _convert(option: Option, raw: Any, source: str) -> Any:
    try:
        value = option.type(raw) if isinstance(raw, str) else raw
        if option.type in (int, float) and not isinstance(value, (int, float)):
            raise ValueError(f"not a number: {raw!r}")
    except ValueError as exc:
        raise SettingsError(f"{source}: invalid value {raw!r} ({exc})") from None
    if option.minimum is not None and value < option.minimum:
        raise SettingsError(f"{source}: {value!r} is below the minimum {option.minimum:g}")
    return value


def load_settings(
    recipe_dir: str | Path,
    flags: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Settings:
    """Resolve every option: flag, then FASTDEPLOY_* variable, then original name, then default."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    unknown = set(flags) - set(_BY_NAME)
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if flags.get(option.name) is not None:
            values[option.name] = _convert(option, flags[option.name], option.flag)
            continue
        for env_name in (option.env, *option.legacy_env):
            if env_name in environ and environ[env_name] != "":
                values[option.name] = _convert(option, environ[env_name], env_name)
                break
        else:
            values[option.name] = option.default
    if values["log_level"].lower() not in ("debug", "info", "warning", "error"):
        raise SettingsError(f"log level must be debug, info, warning or error, not {values['log_level']!r}")
    return Settings(recipe_dir=Path(recipe_dir).resolve(), **values)

