"""``fastdeploy build RECIPE``: a container image for one recipe, in one command.

Writes a ``Dockerfile`` and a ``.dockerignore`` into the build context (the recipe folder,
or ``--out``: a folder above the recipe, or any other folder, which then gets a copy of the
recipe), fastDeploy's own wheel beside them (``own_wheel``: PyPI's ``fastdeploy`` is another
project), and builds the image when ``docker`` or ``podman`` answers; when neither does it
fails, naming the command that builds it (``--no-build`` only writes the files).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastdeploy import __version__, own_wheel
from fastdeploy.errors import FastDeployError, SettingsError
from fastdeploy.recipe import load_recipe

HELP = "write a recipe's Dockerfile and build its container image"
EXAMPLE = ("example (writes recipes/echo/Dockerfile; builds with docker or podman when one answers):\n"
           "  fastdeploy build recipes/echo --tag echo:1.0\n  docker run --rm -p 8080:8080 echo:1.0")
UID = 10001  # the image's user, numeric so that Kubernetes' runAsNonRoot can check it
RECIPE_PATH = "/recipe"
STATE_PATH = "/var/lib/fastdeploy"  # the state folder in the image: writable by UID, never in the recipe
DIST = ".fastdeploy-dist"  # fastDeploy's wheel, in the build context
COPIED = f"{DIST}/recipe"  # the recipe's copy, in a context outside it (--out elsewhere)
NEVER_IN_IMAGE = (".fastdeploy", ".venv", "__pycache__", "*.pyc", ".git")  # the state folder first
MARK = "# Written by `fastdeploy build`"
ENGINES = ("docker", "podman")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe folder (predictor.py and example.py)")
    parser.add_argument("--tag", help="image name (default: the recipe's name)")
    parser.add_argument("--out", help="where the Dockerfile goes: the build context (default: the recipe folder); "
                                      f"a folder that does not hold the recipe gets a copy of it in {COPIED}")
    parser.add_argument("--port", type=int, default=8080,
                        help="port the image serves and exposes (default 8080; `docker run -e FASTDEPLOY_PORT=N` "
                             "moves it)")
    parser.add_argument("--base", help="base image, Debian-like (default: python:X.Y-slim for this Python)")
    parser.add_argument("--no-build", action="store_true", help="only write the files and print the build command "
                                                                "(without it, no engine answering is an error)")


@dataclass(frozen=True)
class Plan:
    """What one build makes: from which recipe, in which context, under which name."""

    recipe: Path
    context: Path
    tag: str
    port: int
    base: str

    @property
    def copied(self) -> bool:
        """Whether the context lies outside the recipe's folders, so the recipe is copied into it."""
        return not self.recipe.is_relative_to(self.context)

    @property
    def source(self) -> str:
        """The recipe folder as the Dockerfile names it: relative to the context."""
        return COPIED if self.copied else self.recipe.relative_to(self.context).as_posix()


def run(args: argparse.Namespace) -> int:
    """The ``build`` command: write the files, then build or say how."""
    plan = make_plan(args.recipe, args.out, args.tag, args.port, args.base)
    try:
        written = write_context(plan)
    except OSError as exc:
        raise FastDeployError(f"cannot write the build files into {plan.context}: {exc.strerror or exc}") from None
    for path in written:
        print(f"wrote {path}")
    if args.no_build:
        print(f"not building (--no-build); build the image with:\n  {shlex.join(build_command('docker', plan))}\n"
              "(podman takes the same arguments)")
        return 0
    engine, why_not = find_engine()
    if engine is None:  # a script or CI job must not go on as if there were an image
        raise FastDeployError(f"no image was built ({why_not}); the files are written: build them with "
                              f"`{shlex.join(build_command('docker', plan))}` (or podman), or pass --no-build "
                              "to only write them")
    command = build_command(engine, plan)
    print(f"building: {shlex.join(command)}", flush=True)
    code = subprocess.run(command).returncode  # the engine's own output goes to the terminal
    if code != 0:
        raise FastDeployError(f"`{shlex.join(command)}` failed (exit code {code}); its output is above")
    name = Path(engine).name
    print(f"built {plan.tag}; run it with:\n  {name} run --rm -p {plan.port}:{plan.port} {plan.tag}")
    return 0


def make_plan(recipe: str, out: Optional[str], tag: Optional[str], port: int, base: Optional[str]) -> Plan:
    """Check the recipe (as ``run`` would) and the options; raises FastDeployError with the fix."""
    loaded = load_recipe(recipe)
    context = Path(out).resolve() if out else loaded.path
    if not 1 <= port <= 65535:
        raise SettingsError(f"--port {port}: must be between 1 and 65535")
    name = re.sub(r"[^a-z0-9._-]+", "-", loaded.name.lower()).strip("._-") or "fastdeploy-recipe"
    default_base = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    return Plan(loaded.path, context, tag or name, port, base or default_base)


def write_context(plan: Plan) -> list[Path]:
    """Dockerfile, .dockerignore and the wheel; never overwrites files someone else wrote."""
    dockerfile, ignore = plan.context / "Dockerfile", plan.context / ".dockerignore"
    for path in (dockerfile, ignore):
        if path.exists() and MARK not in path.read_text(errors="replace"):
            raise FastDeployError(f"{path} exists and was not written by `fastdeploy build`; move it away "
                                  "or write into another folder with --out")
    dist = plan.context / DIST
    dist.mkdir(parents=True, exist_ok=True)
    (dist / ".gitignore").write_text("*\n")  # a build product, never committed
    for old in dist.glob("*.whl"):
        if old.name != own_wheel.wheel_name():
            old.unlink()
    wheel = own_wheel.write_wheel(dist)
    copy = _copy_recipe(plan)
    dockerfile.write_text(dockerfile_text(plan, (plan.recipe / "requirements.txt").is_file()))
    ignore.write_text(dockerignore_text(plan))
    return [dockerfile, ignore, wheel, *copy]


def _copy_recipe(plan: Plan) -> list[Path]:
    """A context outside the recipe gets the recipe's current files (the last run's copy replaced), so it
    holds everything the image needs; what .dockerignore keeps out of an image is not copied either."""
    target = plan.context / COPIED
    if not plan.recipe.is_relative_to(target):  # (a copy given as the recipe is left alone)
        shutil.rmtree(target, ignore_errors=True)  # in fastDeploy's own folder: only ever our copy
    if not plan.copied:
        return []
    skip = shutil.ignore_patterns(*NEVER_IN_IMAGE, DIST)

    def ignored(folder: str, names: list[str]) -> set[str]:  # and the context itself, when it is in the recipe
        return set(skip(folder, names)) | {n for n in names if Path(folder, n).resolve() == plan.context}

    shutil.copytree(plan.recipe, target, ignore=ignored)
    return [target]


def dockerfile_text(plan: Plan, has_requirements: bool) -> str:
    wheel = own_wheel.wheel_name()
    # the port the server resolves (FASTDEPLOY_PORT, which the image sets, else PORT, else 8080), so
    # `docker run -e FASTDEPLOY_PORT=N` moves the server and its health check together
    health = ("import urllib.request; from fastdeploy.settings import load_settings; "
              f"urllib.request.urlopen('http://127.0.0.1:%d/health' % load_settings('{RECIPE_PATH}').port, timeout=4)")
    command = ["fastdeploy", "run", RECIPE_PATH]  # no flags: they would win over -e FASTDEPLOY_...
    origin = f", copied from {plan.recipe}" if plan.copied else ""
    lines = [
        f"{MARK} (fastDeploy {__version__}) for the recipe in {plan.source}{origin}; each run rewrites it.",
        f"# {shlex.join(build_command('docker', plan))}",
        f"FROM {plan.base}",
        "ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore",
        f"RUN groupadd --gid {UID} fastdeploy && useradd --create-home --uid {UID} --gid {UID} fastdeploy \\",
        f" && mkdir -p {STATE_PATH} && chown {UID}:{UID} {STATE_PATH}",
    ]
    if has_requirements:
        lines += [
            "# the recipe's own dependencies first: the slowest layer, rebuilt only when they change",
            _copy(_inside(plan.source, "requirements*.txt"), f"{RECIPE_PATH}/"),
            f"RUN pip install -r {RECIPE_PATH}/requirements.txt",
        ]
    lines += [
        "# fastDeploy from the wheel `fastdeploy build` packed (the `fastdeploy` on PyPI is another project)",
        _copy(f"{DIST}/{wheel}", "/tmp/fastdeploy-dist/"),
        f'RUN pip install "/tmp/fastdeploy-dist/{wheel}[redis]" && rm -rf /tmp/fastdeploy-dist',
        _copy(plan.source, RECIPE_PATH),
        f"USER {UID}:{UID}",
        f"ENV FASTDEPLOY_STATE_DIR={STATE_PATH} FASTDEPLOY_HOST=0.0.0.0 FASTDEPLOY_PORT={plan.port}",
        f"EXPOSE {plan.port}",
        "HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 "
        f"CMD {json.dumps(['python', '-c', health])}",
        f"CMD {json.dumps(command)}",
    ]
    return "\n".join(lines) + "\n"


def dockerignore_text(plan: Plan) -> str:
    """Keeps the state folder (jobs, the store secret), virtual environments, bytecode and git out
    of the build context; a context above the recipe sends only the recipe and the wheel."""
    lines = [f"{MARK}; each run rewrites it."]
    if plan.source != ".":
        lines += ["*", f"!{plan.source}", f"!{DIST}/{own_wheel.wheel_name()}"]
    lines += [f"**/{pattern}" for pattern in NEVER_IN_IMAGE]
    return "\n".join(lines) + "\n"


def build_command(engine: str, plan: Plan) -> list[str]:
    return [engine, "build", "-t", plan.tag, str(plan.context)]


def find_engine() -> tuple[Optional[str], str]:
    """The first of docker and podman whose daemon answers; else None and why not."""
    reasons = []
    for name in ENGINES:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            done = subprocess.run([path, "info"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            reasons.append(f"{name} does not answer: {exc}")
            continue
        if done.returncode == 0:
            return path, ""
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"{name} does not answer: {last}")
    return None, "; ".join(reasons) or "neither docker nor podman is on the PATH"


def _copy(source: str, target: str) -> str:
    """A COPY line; the JSON form where a path has a space in it."""
    return f"COPY {json.dumps([source, target])}" if " " in source else f"COPY {source} {target}"


def _inside(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"
