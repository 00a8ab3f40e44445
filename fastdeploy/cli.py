"""The only place that sees argv: builds Settings and starts the right processes.

    fastdeploy run RECIPE      API server(s) and prediction loop(s), the usual way
    fastdeploy serve RECIPE    API server(s) only (needs --broker to share a queue)
    fastdeploy worker RECIPE   prediction loop(s) only (needs --broker)
    fastdeploy build RECIPE    a Dockerfile for the recipe, and its container image
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import socket
import sys
from typing import Any, NoReturn, Optional, Sequence

from fastdeploy import __version__, legacy_cli, logs
from fastdeploy.errors import FastDeployError
from fastdeploy.settings import GROUPS, OPTIONS, Option, Settings, load_settings

log = logging.getLogger("fastdeploy")

_COMMANDS = {
    "run": "serve a recipe: API server(s) and prediction loop(s)",
    "serve": "API server(s) only; pair with workers through --broker",
    "worker": "prediction loop(s) only; pair with API servers through --broker",
}


_EXAMPLES = {
    "run": "example:\n  fastdeploy run recipes/echo --port 8080\n"
           "  curl -s localhost:8080/sync -H 'Content-Type: application/json' -d '{\"data\": [\"hello\"]}'",
    "serve": "example (API servers here, prediction loops on other hosts, one Redis between them):\n"
             "  fastdeploy serve recipes/echo --broker redis://10.0.0.5:6379/0 --port 8080",
    "worker": "example (prediction loops for stage 0 only, joining API servers through Redis):\n"
              "  fastdeploy worker recipes/echo --broker redis://10.0.0.5:6379/0 --stage 0",
}
_INTERNAL = ("_api", "_loop")  # started by the supervisor, never by people: a parser of their own, not in --help


class _Parser(argparse.ArgumentParser):
    """argparse that names the nearest option or command when one is mistyped (``--bach-size``), and
    takes no abbreviations: ``--stag`` is a typo to point out, not ``--stage`` to guess."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        super().error(message + _suggestion(message, self))


# flags that were removed, and what to do instead (the nearest name could point the opposite way)
_REMOVED = {"--webhook-deny-private": "webhooks to loopback and private addresses are refused by default now; "
                                      "drop the flag (--webhook-allow-private is what allows them)"}


def _suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    """``; did you mean --batch-size?`` for an unrecognized option or an invalid command ("" without one)."""
    if message.startswith("unrecognized arguments:"):
        words = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
        gone = [f"{word} is gone: {_REMOVED[word]}" for word in words if word in _REMOVED]
        if gone:
            return "; " + "; ".join(gone)
        candidates = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    elif (wrong := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)) is not None:
        words, candidates = [wrong.group(1)], re.findall(r"'([^']*)'", wrong.group(2))
    else:
        return ""
    close = [match[0] for word in words if (match := difflib.get_close_matches(word, candidates, n=1, cutoff=0.6))]
    return f"; did you mean {' '.join(close)}?" if close else ""


def _default_text(option: Option) -> str:
    if isinstance(option.default, bool):
        return str(option.default).lower()
    return str(option.default) if option.default != "" else "none"


def _add_settings(parser: argparse.ArgumentParser, command: Optional[str] = None) -> None:
    """The recipe and the settings ``command`` takes (all of them: None), in their ``--help`` sections,
    each with its default and variables."""
    parser.add_argument("recipe", help="recipe folder (predictor.py and example.py)")
    sections = {group: parser.add_argument_group(group) for group in GROUPS}
    for option in OPTIONS:
        if command is not None and command not in option.commands:
            continue  # refused with the reason (_misplaced), and left out of its --help
        names = ", ".join((option.env, *option.legacy_env))
        text = f"{option.help} (default: {_default_text(option)}; env {names})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": text}
        if option.type in (int, float):
            kwargs["metavar"] = "N" if option.type is int else "NUM"
        elif option.type is not str:  # booleans: --only-async or --only-async=false
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        section = sections.get(option.group, sections["other"])
        section.add_argument(option.flag, *option.alias_flags, **kwargs)  # alias flags: renamed options


def build_parser() -> argparse.ArgumentParser:
    """The commands people run; ``fastdeploy COMMAND --help`` shows each one's options by section."""
    parser = _Parser(prog="fastdeploy", description="Serve any Python predictor over HTTP.",
                     epilog="See `fastdeploy COMMAND --help` for a command's options.\n" + _EXAMPLES["run"],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdeploy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, text in _COMMANDS.items():
        sub = commands.add_parser(name, help=text, description=text, epilog=_EXAMPLES.get(name),
                                  usage=f"fastdeploy {name} RECIPE [options]",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_settings(sub, name)
        if name == "worker":
            sub.add_argument("--stage", type=int, action="append", help="serve only this stage (repeatable)")
    from fastdeploy import container  # `build` takes its own few options, not the settings

    container.add_arguments(commands.add_parser("build", help=container.HELP, description=container.HELP,
                                                epilog=container.EXAMPLE, usage="fastdeploy build RECIPE [options]",
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def build_internal_parser() -> argparse.ArgumentParser:
    """The processes the supervisor starts: ``_api`` (one API server on an inherited socket) and
    ``_loop`` (one prediction loop)."""
    parser = _Parser(prog="fastdeploy")
    commands = parser.add_subparsers(dest="command", required=True)
    api = commands.add_parser("_api")
    _add_settings(api)
    api.add_argument("--fd", type=int, required=True)
    api.add_argument("--metrics-dir", help="folder shared by the API processes for their metrics")
    loop = commands.add_parser("_loop")
    _add_settings(loop)
    loop.add_argument("--stage", type=int, required=True)
    loop.add_argument("--worker-id", required=True)
    loop.add_argument("--report-fd", type=int, help="pipe to the supervisor: why the predictor could not start")
    return parser


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; an option no command knows stops it with the nearest one named."""
    if argv[:1] and argv[0] in _INTERNAL:
        return build_internal_parser().parse_args(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(_misplaced(args.command, extra) or
                                             f"unrecognized arguments: {' '.join(extra)}")
    return args


# why a command does nothing with the settings it does not take (their flags are refused, their
# environment variables ignored: one env file may serve every command)
_WHY_NOT = {"worker": "workers serve no HTTP", "serve": "API servers run no predictor"}


def _misplaced(command: str, extra: Sequence[str]) -> str:
    """Why the first setting's flag in ``extra`` does nothing for ``command``; "" when none is a setting's."""
    by_flag = {flag: option for option in OPTIONS for flag in (option.flag, *option.alias_flags)}
    for word in extra:
        flag = word.split("=", 1)[0]
        option = by_flag.get(flag)
        if option is None or command in option.commands:
            continue
        if command == "build":
            return (f"{flag} does nothing for `fastdeploy build`: the image reads its settings from its "
                    f"environment when it runs (docker run -e {option.env}=...)")
        target = next((c for c in option.commands if c != "run"), "run")
        return f"{flag} does nothing for `fastdeploy {command}`: {_WHY_NOT[command]}; give it to `fastdeploy {target}`"
    return ""


def _role(args: argparse.Namespace) -> str:
    """What this process is, on every log line it writes."""
    if args.command == "_api":
        return "api"
    if args.command == "_loop":
        return f"loop stage {args.stage}"
    return "supervisor" if args.command in ("run", "serve", "worker") else args.command


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if legacy_cli.is_legacy(argv):  # `fastdeploy --recipe DIR --rest` (3.x): say the new command, then run it
        try:
            argv, note = legacy_cli.translate(argv)
        except FastDeployError as exc:
            print(f"fastdeploy: error: {exc.reason}", file=sys.stderr)
            return 2
        print(f"fastdeploy: {note}", file=sys.stderr)
    args = _parse(argv)
    if args.command == "build":
        return _build(args)
    flags = {o.name: getattr(args, o.name, None) for o in OPTIONS}  # those this command takes
    settings: Optional[Settings] = None
    try:
        settings = load_settings(args.recipe, flags)
        logs.configure(settings.log_level, settings.log_format, _role(args))
        if not args.command.startswith("_"):
            for name in ("store_secret", "api_keys", "webhook_secret"):
                if getattr(args, name, None) is not None:
                    log.warning("--%s on a command line is visible to other users of this host (ps); prefer "
                                "FASTDEPLOY_%s", name.replace("_", "-"), name.upper())
        return _dispatch(args, settings)
    except FastDeployError as exc:
        if settings is not None and settings.log_format == "json":
            log.error("%s", exc.reason)  # a log collector reads every line as JSON
        else:
            print(f"fastdeploy: error: {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _build(args: argparse.Namespace) -> int:
    from fastdeploy import container

    try:
        return container.run(args)
    except FastDeployError as exc:
        print(f"fastdeploy: error: {exc.reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C during the engine's build
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
        # the one place uvicorn learns it: X-Forwarded-For is believed from these proxies only
        proxy_headers=settings.trusted_proxies is not None, forwarded_allow_ips=settings.trusted_proxies,
        lifespan="on",
        access_log=False,
        log_config=None, log_level=None,  # uvicorn's loggers go through ours (logs.configure), in our format
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
