"""The fastDeploy 3.x command line, translated: ``fastdeploy --recipe DIR --rest`` and ``--loop``.

3.x started the REST server and the prediction loop as two commands sharing one folder
(its Dockerfile ran both, ``--rest & --loop``). Here they map to ``serve`` and ``worker``,
which share the recipe's embedded store the same way, so those command lines keep working;
both flags at once is ``run``. The new command is printed in one line, so people can switch.
What has no counterpart (``--build``, unknown ``--config`` keys) stops with one line saying
what to run instead.
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping, Optional, Sequence

from fastdeploy.errors import SettingsError
from fastdeploy.settings import OPTIONS

COMMANDS = ("run", "serve", "worker", "build", "_api", "_loop")
LEGACY_FLAGS = ("--recipe", "--rest", "--loop", "--build", "--config")
# 3.x --config keys -> our flags (the same meaning); "base" only named the Docker base image
CONFIG_FLAGS = {
    "workers": "--http-processes", "timeout": "--timeout", "host": "--host", "port": "--port",
    "allow_pickle": "--allow-pickle", "max_request_batch_size": "--max-per-client-batch",
    "optimal_batch_size": "--batch-size", "keep_alive": "--keep-alive",
}
IGNORED_CONFIG = ("base", "predictor_name")


def is_legacy(argv: Sequence[str]) -> bool:
    """Whether argv is a 3.x command line: no command first, and a 3.x flag somewhere."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return False
    return any(arg.split("=", 1)[0] in LEGACY_FLAGS for arg in argv)


def translate(argv: Sequence[str], environ: Optional[Mapping[str, str]] = None) -> tuple[list[str], str]:
    """The new command line for a 3.x one, and the one line that tells the user so;
    SettingsError (one line) when there is nothing to translate to."""
    parser = argparse.ArgumentParser(prog="fastdeploy", add_help=False)
    parser.add_argument("--recipe")
    parser.add_argument("--rest", action="store_true")
    parser.add_argument("--loop", action="store_true")
    parser.add_argument("--build", action="store_true")
    parser.add_argument("--config")
    known, rest = parser.parse_known_args(list(argv))
    recipe = known.recipe
    if known.build:
        raise SettingsError(f"--build (the 3.x Dockerfile generator) is now `fastdeploy build {recipe or 'RECIPE_DIR'}`"
                            f"; the image it builds runs `fastdeploy run {recipe or 'RECIPE_DIR'}`")
    if not recipe:
        raise SettingsError("the 3.x command line needs --recipe DIR; this version's command is `fastdeploy run DIR`")
    if not (known.rest or known.loop):
        raise SettingsError(f"say what to start (3.x: --rest or --loop); this version's command is "
                            f"`fastdeploy run {recipe}` (API server and prediction loop together)")
    command = "run" if known.rest and known.loop else "serve" if known.rest else "worker"
    new = [command, recipe, *_config_flags(known.config, os.environ if environ is None else environ, command), *rest]
    note = (f"`{' '.join(argv)}` is the fastDeploy 3.x command line; running `fastdeploy {' '.join(new)}`"
            + (" (API and loop in one command: `fastdeploy run`)" if command != "run" else ""))
    return new, note


def _config_flags(config: Optional[str], environ: Mapping[str, str], command: str) -> list[str]:
    """3.x ``--config "k=v, ..."`` as flags; as in 3.x, an environment variable named like a key wins.
    3.x gave one config to --rest and --loop alike: a key that does nothing for ``command`` (port for a
    worker, the batch size for API servers) is left out, where its flag would be refused."""
    applies = {flag for option in OPTIONS if command in option.commands for flag in (option.flag, *option.alias_flags)}
    flags: list[str] = []
    for item in (config or "").split(","):
        key, _, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not key or not value or key in IGNORED_CONFIG or environ.get(key.upper()) is not None:
            continue
        if key not in CONFIG_FLAGS:
            raise SettingsError(f"--config key {key!r} has no counterpart; "
                                "see `fastdeploy run --help` for the settings")
        if CONFIG_FLAGS[key] in applies:
            flags += [CONFIG_FLAGS[key], value]
    return flags
