"""The only place that sees argv: builds Settings and starts the right processes.

    fastdeploy run RECIPE      API server(s) and prediction loop(s), the usual way
    fastdeploy serve RECIPE    API server(s) only (needs --broker to share a queue)
    fastdeploy worker RECIPE   prediction loop(s) only (needs --broker)
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from typing import Any, Optional, Sequence

from fastdeploy import __version__, legacy_cli
from fastdeploy.errors import FastDeployError
from fastdeploy.settings import OPTIONS, Settings, load_settings

log = logging.getLogger("fastdeploy")

_COMMANDS = {
    "run": "serve a recipe: API server(s) and prediction loop(s)",
    "serve": "API server(s) only; pair with workers through --broker",
    "worker": "prediction loop(s) only; pair with API servers through --broker",
}


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe folder (predictor.py and example.py)")
    for option in OPTIONS:
        names = ", ".join((option.env, *option.legacy_env))
        kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": f"{option.help} [env {names}]"}
        if option.type not in (int, float, str):  # booleans: --only-async or --only-async=false
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        parser.add_argument(option.flag, *option.alias_flags, **kwargs)  # alias flags: renamed options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdeploy", description="Serve any Python predictor over HTTP.")
    parser.add_argument("--version", action="version", version=f"fastdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in _COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text)
        _add_settings(sub)
        if name == "worker":
            sub.add_argument("--stage", type=int, action="append", help="serve only this stage (repeatable)")
    api = commands.add_parser("_api")  # internal: one API server process on an inherited socket
    _add_settings(api)
    api.add_argument("--fd", type=int, required=True)
    api.add_argument("--metrics-dir", help="folder shared by the API processes for their metrics")
    loop = commands.add_parser("_loop")  # internal: one prediction loop process
    _add_settings(loop)
    loop.add_argument("--stage", type=int, required=True)
    loop.add_argument("--worker-id", required=True)
    loop.add_argument("--report-fd", type=int, help="pipe to the supervisor: why the predictor could not start")
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if legacy_cli.is_legacy(argv):  # `fastdeploy --recipe DIR --rest` (3.x): say the new command, then run it
        try:
            argv, note = legacy_cli.translate(argv)
        except FastDeployError as exc:
            print(f"fastdeploy: error: {exc.reason}", file=sys.stderr)
            return 2
        print(f"fastdeploy: {note}", file=sys.stderr)
    args = build_parser().parse_args(argv)
    flags = {o.name: getattr(args, o.name) for o in OPTIONS}
    try:
        settings = load_settings(args.recipe, flags)
        _configure_logging(settings.log_level)
        if not args.command.startswith("_"):
            for name in ("store_secret", "api_keys", "webhook_secret"):
                if getattr(args, name) is not None:
                    log.warning("--%s on a command line is visible to other users of this host (ps); prefer "
                                "FASTDEPLOY_%s", name.replace("_", "-"), name.upper())
        return _dispatch(args, settings)
    except FastDeployError as exc:
        print(f"fastdeploy: error: {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from fastdeploy.recipe import load_recipe

    recipe = load_recipe(settings.recipe_dir)
    if args.command == "_api":
        return _run_api(settings, recipe, args.fd, args.metrics_dir)
    if args.command == "_loop":
        return _run_loop(settings, recipe, args.stage, args.worker_id, args.report_fd)
    from fastdeploy.supervisor import Supervisor

    if args.command in ("run", "serve"):
        from fastdeploy.http.auth import ApiKeys

        ApiKeys(settings.api_keys, settings.api_keys_file)  # a bad keys file stops here, not in every API server
    if args.command in ("serve", "worker") and not settings.broker:
        log.warning(
            "no --broker given: %s uses the embedded store in %s, shared only with processes on this host",
            args.command, settings.state_path,
        )
    stages = None
    if args.command == "worker" and args.stage:
        bad = [s for s in args.stage if not 0 <= s < recipe.stages]
        if bad:
            raise FastDeployError(f"--stage {bad[0]} does not exist; this recipe has stages 0..{recipe.stages - 1}")
        stages = sorted(set(args.stage))
    supervisor = Supervisor(
        settings, recipe, serve_api=args.command in ("run", "serve"), run_loops=args.command in ("run", "worker"),
        stages=stages,
    )
    return supervisor.run()


def _run_api(settings: Settings, recipe: Any, fd: int, metrics_dir: Optional[str]) -> int:
    if metrics_dir:
        # prometheus_client chooses file-backed values when it is first imported
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    import uvicorn

    from fastdeploy.http.app import create_app
    from fastdeploy.http.connections import Limits, protocol_class, raise_open_file_limit

    raise_open_file_limit(settings.max_connections)  # every connection holds a descriptor
    config = uvicorn.Config(
        create_app(settings, recipe, metrics_dir),
        loop="auto",
        # uvicorn's parser with a deadline for request heads and a cap on connections
        http=protocol_class(Limits(settings.header_timeout, settings.max_connections)),
        timeout_keep_alive=settings.keep_alive,  # type: ignore[arg-type]  # seconds; a float works (call_later)
        lifespan="on",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.timeout) + 5,
        backlog=4096,
    )
    # socket(fileno=) keeps the inherited socket's real family (uvicorn's own fd= option
    # assumes a Unix socket, which leaves Nagle on for TCP and costs 40 ms per keep-alive answer)
    listener = socket.socket(fileno=fd)
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def _run_loop(settings: Settings, recipe: Any, stage: int, worker_id: str, report_fd: Optional[int]) -> int:
    """One prediction loop. A predictor that cannot start exits STARTUP_FAILED_EXIT with its reason
    told to the supervisor (``report_fd``), which stops the service instead of restarting it forever."""
    from fastdeploy.loop import PredictionLoop
    from fastdeploy.recipe import StartupFailed
    from fastdeploy.store import open_backend
    from fastdeploy.supervisor import STARTUP_FAILED_EXIT

    if report_fd is not None:
        os.set_inheritable(report_fd, False)  # the predictor's own subprocesses must not hold it open
    backend = open_backend(settings.broker, settings.state_path, settings.spin_seconds)
    loop = PredictionLoop(settings, recipe, stage, worker_id, backend.store, backend.doorbell)
    loop.install_signal_handlers()
    try:
        loop.run()
    except StartupFailed as exc:
        log.debug("the predictor's traceback (LOG_LEVEL=debug)", exc_info=exc.__cause__)
        _report(report_fd, exc.reason)
        return STARTUP_FAILED_EXIT
    finally:
        backend.close()
    return 0


def _report(fd: Optional[int], reason: str) -> None:
    """Tell the supervisor why this loop stops (it prints it once); without one, print it here."""
    if fd is not None:
        try:
            os.write(fd, reason.encode(errors="replace")[:8192])
            return
        except OSError as exc:
            log.debug("could not report to the supervisor: %s", exc)
    print(f"fastdeploy: error: {reason}", file=sys.stderr)
