"""One typed, frozen Settings object, read from flags and the environment in one place.

Every option is declared once, as a field of ``Settings`` with its default and its
metadata (help, original environment names, minimum, extra flags, the commands it does
something for: by default its group's); ``OPTIONS`` is derived from those fields, so a
default cannot drift between two lists. The original fastDeploy
names such as ``TIMEOUT`` keep working. Precedence: command-line flag, then
``FASTDEPLOY_<NAME>``, then the original names in order, then the default.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from fastdeploy.devices import parse as parse_devices
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
    """How one setting is named, typed and documented (derived from a ``Settings`` field)."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    legacy_env: tuple[str, ...] = ()
    minimum: Optional[float] = None
    aliases: tuple[str, ...] = ()  # former setting names, still accepted as flags
    group: str = "other"  # where `--help` lists it (one of GROUPS)
    commands: tuple[str, ...] = ("run", "serve", "worker")  # the commands it does something for (COMMANDS)

    @property
    def env(self) -> str:
        return "FASTDEPLOY_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def alias_flags(self) -> tuple[str, ...]:
        """Extra flags for the same setting, so renamed options keep old command lines working."""
        return tuple("--" + alias.replace("_", "-") for alias in self.aliases)


def _meta(
    text: str,
    *,
    env: tuple[str, ...] = (),
    minimum: Optional[float] = None,
    aliases: tuple[str, ...] = (),
    group: str = "other",
    commands: Optional[tuple[str, ...]] = None,
) -> dict[str, Any]:
    """Field metadata that makes a ``Settings`` field an option; keeps each declaration on one line.
    ``commands``: those it does something for, when they differ from its group's (GROUP_COMMANDS)."""
    return {"help": text, "legacy_env": env, "minimum": minimum, "aliases": aliases, "group": group,
            "commands": commands or GROUP_COMMANDS.get(group, COMMANDS)}


# the sections of `fastdeploy run --help`, in order; an option names its own (``group=``)
GROUPS = ("server", "batching", "prediction loops", "store", "limits", "security", "webhooks", "logging", "other")
# the commands that take settings: `run` starts API servers and prediction loops, `serve` only the
# API servers, `worker` only the loops; a flag is refused by a command it would do nothing for
COMMANDS = ("run", "serve", "worker")
API_COMMANDS = ("run", "serve")
LOOP_COMMANDS = ("run", "worker")
GROUP_COMMANDS = {"server": API_COMMANDS, "limits": API_COMMANDS, "security": API_COMMANDS,
                  "webhooks": API_COMMANDS, "batching": LOOP_COMMANDS, "prediction loops": LOOP_COMMANDS}


@dataclass(frozen=True)
class Settings:
    """Everything a fastDeploy process needs to know, resolved once at start-up."""

    recipe_dir: Path
    host: str = field(default="0.0.0.0", metadata=_meta(
        "address the HTTP server listens on", env=("HOST",), group="server"))
    port: int = field(default=8080, metadata=_meta(
        "port the HTTP server listens on", env=("PORT",), minimum=0, group="server"))
    state_dir: str = field(default="", metadata=_meta(
        "folder for the embedded store (default RECIPE/.fastdeploy)", group="store"))
    broker: str = field(default="", metadata=_meta(
        "redis://HOST:PORT/DB to share one queue between hosts; empty = embedded SQLite store", group="store"))
    store_secret: str = field(default="", repr=False, metadata=_meta(
        "key that signs what chain stages hand each other through the store and, on --broker, every job record; "
        "required with --broker for a chain; the same on every host, API servers included; empty = generated into "
        "the state folder for the embedded store", group="store"))
    timeout: float = field(default=480.0, metadata=_meta(
        "seconds a /sync request may wait before 504", env=("TIMEOUT",), minimum=0.001, group="limits"))
    max_per_client_batch: int = field(default=0, metadata=_meta(
        "most inputs in one request (0 = no limit)", env=("MAX_PER_CLIENT_BATCH", "MAX_REQUEST_BATCH_SIZE"), minimum=0,
        group="limits"))
    only_async: bool = field(default=False, metadata=_meta(
        "refuse /sync (clients must use /async)", env=("ONLY_ASYNC",), group="server"))
    allow_pickle: bool = field(default=False, metadata=_meta(
        "accept pickle bodies on POST /infer (fastDeploy 3.x clients use pickle when it is on); unpickling runs "
        "code, so turn it on only when every client is trusted", env=("ALLOW_PICKLE",), group="security"))
    batch_size: int = field(default=0, metadata=_meta(
        "fix the batch size instead of measuring it at start-up (0 = measure)", env=("BATCH_SIZE", "OPTIMAL_BATCH_SIZE"),
        minimum=0, group="batching"))
    max_batch_size: int = field(default=256, metadata=_meta(
        "largest batch size the start-up search tries", minimum=1, group="batching"))
    max_wait: float = field(default=0.5, metadata=_meta(
        "how long a loop waits for a fuller batch, as a multiple of the time per example (only under load)",
        env=("MAX_WAIT",), minimum=0, group="batching"))
    http_processes: int = field(default=0, metadata=_meta(
        "HTTP server processes sharing the port (0 = one per CPU core, at most 4)",
        env=("FASTDEPLOY_WORKERS", "WORKERS"), minimum=0, aliases=("workers",), group="server"))
    replicas: int = field(default=1, metadata=_meta(
        "prediction loop processes per stage on the CPU (on GPUs: --replicas-per-device)", minimum=1,
        group="prediction loops"))
    devices: str = field(default="auto", metadata=_meta(
        "where the prediction loops run: auto (every GPU nvidia-smi -L lists, else the CPU), cpu, or GPU "
        "indices or UUIDs like 0,1; each loop process sees only its own GPU (CUDA_VISIBLE_DEVICES)",
        group="prediction loops"))
    replicas_per_device: int = field(default=1, metadata=_meta(
        "prediction loop processes per stage on each GPU (on the CPU it multiplies --replicas)", minimum=1,
        group="prediction loops"))
    threads: int = field(default=0, metadata=_meta(
        "torch / ONNX Runtime / BLAS threads per loop (0 = cores / loop processes)", minimum=0,
        group="prediction loops"))
    spin_us: float = field(default=1000.0, metadata=_meta(
        "microseconds a loop or API server polls for the next ring before sleeping, only while a lone client "
        "sends request after request (0 = always sleep)", env=("SPIN_US",), minimum=0, group="batching",
        commands=COMMANDS))
    result_ttl: float = field(default=3600.0, metadata=_meta(
        "seconds a finished result stays readable", env=("RESULT_TTL",), minimum=1, group="store",
        commands=API_COMMANDS))
    sync_result_ttl: float = field(default=20.0, metadata=_meta(
        "seconds a prediction its caller waited for (/sync, /infer, OpenAI, v2, MCP), and so has already, stays "
        "readable at /result (at most --result-ttl; failures stay --result-ttl)", minimum=1, group="store",
        commands=API_COMMANDS))
    max_body_mb: float = field(default=100.0, metadata=_meta(
        "largest request body in MiB (413 above)", minimum=0.001, group="limits"))
    max_file_mb: float = field(default=1024.0, metadata=_meta(
        "largest file in a multipart upload in MiB, checked while it streams to disk (413 above)", minimum=0.001,
        group="limits"))
    max_upload_mb: float = field(default=4096.0, metadata=_meta(
        "largest multipart upload in MiB, all its files together (413 above); where uploads travel through Redis "
        "(--broker without --files-dir) --max-body-mb bounds them too", minimum=0.001, group="limits"))
    files_dir: str = field(default="", metadata=_meta(
        "folder uploaded files stay in until their job ends (default STATE_DIR/files); with --broker, a folder "
        "every API server and worker shares (empty: uploads travel through Redis)", group="store"))
    header_timeout: float = field(default=10.0, metadata=_meta(
        "seconds a connection has to send a complete request head (from opening, or from its first byte after "
        "an answer) before it is closed", minimum=0.001, group="server"))
    keep_alive: float = field(default=5.0, metadata=_meta(
        "seconds an idle keep-alive connection stays open after an answer", env=("KEEP_ALIVE",), minimum=0,
        group="server"))
    max_connections: int = field(default=1000, metadata=_meta(
        "most open connections per HTTP server process; more get 503 at once (0 = no limit)", minimum=0,
        group="server"))
    queue_limit: int = field(default=100000, metadata=_meta(
        "most unfinished jobs before /sync and /async answer 503", minimum=1, group="limits"))
    queue_limit_per_key: int = field(default=0, metadata=_meta(
        "most unfinished jobs one API key (or, without keys, one client address) may have; more get 429 "
        "(0 = no limit)", minimum=0, group="limits"))
    api_keys: str = field(default="", repr=False, metadata=_meta(
        "comma-separated API keys; when set (or --api-keys-file), every endpoint but /health and /ready "
        "needs one (Authorization: Bearer KEY or X-API-Key: KEY)", group="security"))
    api_keys_file: str = field(default="", metadata=_meta(
        "file with one API key per line (# comments); re-read on SIGHUP (emptied or deleted: every key it held "
        "is refused)", group="security"))
    metrics_open: bool = field(default=False, metadata=_meta(
        "serve /metrics without an API key (for scrapers)", group="security"))
    cors_origins: str = field(default="", metadata=_meta(
        "comma-separated origins (scheme://host[:port]) whose web pages may call this service, * for any "
        "(empty = no CORS headers)", group="security"))
    forwarded_allow_ips: str = field(default="127.0.0.1,::1", metadata=_meta(
        "comma-separated proxy addresses (or *) whose X-Forwarded-For names the client: its lane in the fair "
        "share without API keys (none = believe no proxy)", env=("FORWARDED_ALLOW_IPS",), group="security"))
    lease_seconds: float = field(default=30.0, metadata=_meta(
        "how long a claimed job stays with a loop that stops heartbeating", minimum=0.1, group="store",
        commands=LOOP_COMMANDS))
    heartbeat_seconds: float = field(default=1.0, metadata=_meta(
        "how often loops report they are alive", minimum=0.01, group="store"))
    webhook_attempts: int = field(default=8, metadata=_meta(
        "deliveries tried per webhook before giving up", minimum=1, group="webhooks"))
    webhook_timeout: float = field(default=10.0, metadata=_meta(
        "seconds a webhook receiver has to answer", minimum=0.01, group="webhooks"))
    webhook_backoff: float = field(default=1.0, metadata=_meta(
        "first retry delay in seconds, counted from when the failed attempt's --webhook-timeout ran out; "
        "doubles each attempt", minimum=0, group="webhooks"))
    webhook_hosts: str = field(default="", metadata=_meta(
        "comma-separated hosts webhooks may target, loopback or private ones included (empty = any host "
        "outside loopback and private networks, unless --webhook-allow-private)", group="webhooks"))
    webhook_secret: str = field(default="", repr=False, metadata=_meta(
        "whsec_<base64> secret that signs every webhook (Standard Webhooks headers; empty = unsigned)",
        group="webhooks"))
    webhook_allow_private: bool = field(default=False, metadata=_meta(
        "let webhooks reach loopback and private addresses (127/8, 10/8, 192.168/16, ::1, ...), refused by "
        "default; turn on only when every client may reach this host's network (link-local and metadata "
        "addresses stay refused; a host named in --webhook-hosts is allowed without it)", group="webhooks"))
    log_level: str = field(default="info", metadata=_meta("debug, info, warning or error", group="logging"))
    log_format: str = field(default="text", metadata=_meta(
        "text (one line per event, for people) or json (one object per line, for log collectors)", group="logging"))

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else self.recipe_dir / ".fastdeploy"

    @property
    def api_processes(self) -> int:
        """How many HTTP server processes to run: http_processes, or one per core (at most 4)."""
        return self.http_processes or max(1, min(4, os.cpu_count() or 1))

    @property
    def spin_seconds(self) -> float:
        return self.spin_us / 1_000_000

    @property
    def waited_result_ttl(self) -> float:
        """Seconds a result its caller waited for is kept: never longer than any other result."""
        return min(self.sync_result_ttl, self.result_ttl)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def cors_origin_list(self) -> list[str]:
        return cors_origin_list(self.cors_origins)

    @property
    def trusted_proxies(self) -> Optional[str]:
        """The proxies whose X-Forwarded-For is believed, as uvicorn takes them; None: none is."""
        value = self.forwarded_allow_ips.strip()
        return None if value.lower() == "none" else value

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


# `from __future__ import annotations` leaves field types as strings: name each parser explicitly
_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def _options_from_fields() -> tuple[Option, ...]:
    """One Option per ``Settings`` field that carries option metadata (all but recipe_dir)."""
    options: list[Option] = []
    for f in dataclasses.fields(Settings):
        if "help" not in f.metadata:
            continue
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if type_name not in _PARSERS:
            raise TypeError(f"setting {f.name}: no parser for type {type_name!r}")
        options.append(Option(
            name=f.name,
            type=_PARSERS[type_name],
            default=f.default,
            help=f.metadata["help"],
            legacy_env=f.metadata["legacy_env"],
            minimum=f.metadata["minimum"],
            aliases=f.metadata["aliases"],
            group=f.metadata["group"],
            commands=f.metadata["commands"],
        ))
    return tuple(options)


OPTIONS: tuple[Option, ...] = _options_from_fields()

_BY_NAME = {option.name: option for option in OPTIONS}


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


_PATHS = ("state_dir", "api_keys_file", "files_dir")  # options that name a file or folder


def webhook_signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (24 to 64 bytes, as the specification says); SettingsError otherwise."""
    where = "--webhook-secret (FASTDEPLOY_WEBHOOK_SECRET)"
    if not secret.startswith("whsec_"):
        raise SettingsError(f"{where} must be whsec_ followed by base64 of 24 to 64 random bytes, "
                            "e.g. whsec_$(openssl rand -base64 32)")
    try:
        key = base64.b64decode(secret[6:], validate=True)
    except (binascii.Error, ValueError):
        raise SettingsError(f"{where}: the part after whsec_ is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise SettingsError(f"{where}: the key is {len(key)} bytes; use 24 to 64 random bytes")
    return key


_ORIGIN = re.compile(r"https?://[^/\s?#@]+")


def cors_origin_list(text: str) -> list[str]:
    """The origins of --cors-origins; SettingsError for one a browser could never send (a path,
    no scheme), which would otherwise silently allow nothing."""
    origins = [o.strip() for o in text.split(",") if o.strip()]
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise SettingsError(f"--cors-origins (FASTDEPLOY_CORS_ORIGINS): {origin!r} is not an origin; write "
                                "scheme://host[:port] without a path, like https://app.example.com, or *")
    return origins


def load_settings(
    recipe_dir: str | Path,
    flags: Optional[Mapping[str, Any]] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> Settings:
    """Resolve every option: flag, then FASTDEPLOY_* variable, then original names in order, then default."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    for option in OPTIONS:  # a former name given by a caller counts as the option's own
        for alias in option.aliases:
            if alias in flags and flags.get(option.name) is None:
                flags[option.name] = flags.pop(alias)
            else:
                flags.pop(alias, None)
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
    if values["log_format"] not in ("text", "json"):
        raise SettingsError(f"--log-format (FASTDEPLOY_LOG_FORMAT) must be text or json, not {values['log_format']!r}")
    cors_origin_list(values["cors_origins"])  # a malformed origin stops the command, naming the option
    if not values["forwarded_allow_ips"].strip():  # an empty value would not reach the API servers
        raise SettingsError("--forwarded-allow-ips (FASTDEPLOY_FORWARDED_ALLOW_IPS) is empty; "
                            "write none to believe no proxy's X-Forwarded-For")
    try:  # a malformed device list stops the command, naming the option
        values["devices"] = ",".join(parse_devices(values["devices"]))
    except ValueError as exc:
        raise SettingsError(f"--devices (FASTDEPLOY_DEVICES): {exc}") from None
    if values["webhook_secret"]:
        webhook_signing_key(values["webhook_secret"])  # a malformed secret stops the command, naming the option
    for name in _PATHS:  # relative to where the command was started, not to the recipe folder children run in
        if values[name]:
            values[name] = str(Path(values[name]).resolve())
    return Settings(recipe_dir=Path(recipe_dir).resolve(), **values)

