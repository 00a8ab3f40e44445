"""``fastdeploy build`` (issue #15, point 3): the Dockerfile it writes parses and says what an image
needs; the install steps in it give a working ``fastdeploy run`` in a fresh venv; the state folder
never reaches an image or git; a real image is built where an engine and the base image are here."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import requests

from fastdeploy import container, own_wheel
from fastdeploy.cli import build_parser
from tests.helpers import RECIPES, ROOT, free_port, running, serve, wait_until

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="pip install dockerfile-parse (the test extra)")
docker_build = pytest.importorskip("docker.utils.build", reason="pip install docker (the test extra)")

BASE = f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
# what a RUN step may do besides installing with pip: set up the user and the state folder, clean up
SYSTEM_STEPS = ("groupadd", "useradd", "mkdir", "chown", "rm")


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """The echo recipe, with a requirement of its own that the predictor imports."""
    folder = tmp_path / "echo"
    shutil.copytree(RECIPES / "echo", folder, ignore=shutil.ignore_patterns(".*", "__pycache__"))  # no live state
    (folder / "requirements.txt").write_text("six\n")  # not a dependency of fastDeploy
    predictor = folder / "predictor.py"
    predictor.write_text("import six  # installed from requirements.txt\n\n" + predictor.read_text())
    return folder


def fastdeploy_build(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastdeploy", "build", *args], capture_output=True, text=True,
                          cwd=str(ROOT), env=env, timeout=600)


def parsed(folder: Path) -> Any:
    return dockerfile_parse.DockerfileParser(fileobj=open(folder / "Dockerfile", "rb"))


def steps(dockerfile: Any) -> list[tuple[str, str]]:
    return [(i["instruction"], i["value"]) for i in dockerfile.structure if i["instruction"] != "COMMENT"]


def context_files(folder: Path) -> set[str]:
    """What the engine sends as the build context: the files .dockerignore lets through."""
    patterns = [line for line in (folder / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return set(docker_build.exclude_paths(str(folder), patterns))


def test_the_dockerfile_parses_and_has_what_an_image_needs(recipe):
    done = fastdeploy_build(str(recipe), "--no-build")
    assert done.returncode == 0, done.stderr
    assert f"docker build -t echo {recipe}" in done.stdout  # the exact command to run
    dockerfile = parsed(recipe)
    assert dockerfile.baseimage == BASE  # this Python's minor version
    found = steps(dockerfile)
    kinds = [kind for kind, _ in found]
    user = dict(found)["USER"].split(":")[0]
    assert user not in ("root", "0") and kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    assert int(user) == container.UID  # the user the Kubernetes manifest runs as
    assert int(dict(found)["EXPOSE"]) == 8080
    command = json.loads(dict(found)["CMD"])  # the exec (JSON) form: signals reach fastdeploy itself
    assert command == ["fastdeploy", "run", container.RECIPE_PATH]  # no flags: `docker run -e` can change any setting
    assert build_parser().parse_args(command[1:]).command == "run"
    assert (dockerfile.envs["FASTDEPLOY_HOST"], dockerfile.envs["FASTDEPLOY_PORT"]) == ("0.0.0.0", "8080")
    health = dict(found)["HEALTHCHECK"]
    check = json.loads(health[health.index("CMD ") + 4:])
    assert check[:2] == ["python", "-c"] and "/health" in check[2] and "load_settings" in check[2]
    state = dockerfile.envs["FASTDEPLOY_STATE_DIR"]
    assert not state.startswith(container.RECIPE_PATH)
    # layers: the recipe's requirements, then fastDeploy, then the recipe itself (changes most often)
    runs = [value for kind, value in found if kind == "RUN"]
    requirements = next(i for i, r in enumerate(runs) if "-r /recipe/requirements.txt" in r)
    wheel = next(i for i, r in enumerate(runs) if own_wheel.wheel_name() in r)
    assert requirements < wheel
    last_run = max(i for i, kind in enumerate(kinds) if kind == "RUN")
    assert found.index(("COPY", f". {container.RECIPE_PATH}")) > last_run and kinds[-1] == "CMD"
    # a second run rewrites its own files, and fastDeploy's wheel comes out byte for byte the same,
    # so an engine keeps the install layer cached
    wheel_file = recipe / container.DIST / own_wheel.wheel_name()
    first = wheel_file.read_bytes()
    assert fastdeploy_build(str(recipe), "--no-build", "--port", "9000").returncode == 0
    assert wheel_file.read_bytes() == first
    assert int(dict(steps(parsed(recipe)))["EXPOSE"]) == 9000 and parsed(recipe).envs["FASTDEPLOY_PORT"] == "9000"


def test_the_dockerignore_keeps_the_state_folder_venvs_and_git_out(recipe):
    for junk in (".fastdeploy/jobs.sqlite3", ".venv/bin/python", "__pycache__/predictor.cpython-311.pyc",
                 ".git/HEAD", "sub/.fastdeploy/store_secret"):
        (recipe / junk).parent.mkdir(parents=True, exist_ok=True)
        (recipe / junk).write_text("x")
    assert fastdeploy_build(str(recipe), "--no-build").returncode == 0
    sent = context_files(recipe)
    assert {"predictor.py", "example.py", "requirements.txt", "Dockerfile"} <= sent
    assert f"{container.DIST}/{own_wheel.wheel_name()}" in sent
    leaked = [p for p in sent if any(part in (".fastdeploy", ".venv", "__pycache__", ".git")
                                     for part in Path(p).parts)]
    assert leaked == []


def test_a_context_above_the_recipe_sends_only_the_recipe_and_the_wheel(recipe, tmp_path):
    (tmp_path / "unrelated.bin").write_bytes(b"x" * 1000)
    (tmp_path / "other_recipe").mkdir()
    (tmp_path / "other_recipe" / "predictor.py").write_text("")
    recipe = recipe.rename(tmp_path / "my echo")  # a space: COPY takes its JSON form
    done = fastdeploy_build(str(recipe), "--out", str(tmp_path), "--tag", "my/echo:1", "--no-build")
    assert done.returncode == 0, done.stderr
    assert f"docker build -t my/echo:1 {tmp_path}" in done.stdout
    found = steps(parsed(tmp_path))
    assert ("COPY", json.dumps(["my echo", container.RECIPE_PATH])) in found
    assert ("COPY", json.dumps(["my echo/requirements*.txt", "/recipe/"])) in found
    sent = context_files(tmp_path)
    assert "my echo/predictor.py" in sent and not [p for p in sent if "unrelated" in p or "other_recipe" in p]
    assert not (recipe / "Dockerfile").exists()


def _as_the_image_runs(context: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """The image's CMD (this checkout's fastdeploy, /recipe being what COPY puts there), its ENV and its
    HEALTHCHECK, read from the Dockerfile in ``context``; nothing is built or installed."""
    found = steps(parsed(context))
    copies = [json.loads(v) if v.startswith("[") else shlex.split(v) for kind, v in found if kind == "COPY"]
    source = next(context / words[0] for words in copies if words[-1] == container.RECIPE_PATH)
    image_env: dict[str, str] = {}
    for kind, value in found:
        if kind == "ENV":
            image_env.update(dict(pair.split("=", 1) for pair in shlex.split(value)))
    command = [str(source) if w == container.RECIPE_PATH else w for w in json.loads(dict(found)["CMD"])]
    health = json.loads(dict(found)["HEALTHCHECK"].split("CMD ", 1)[1])
    return [sys.executable, "-m", *command], image_env, [sys.executable, *health[1:]]


def _container_env(image_env: dict[str, str], state: Path, port: int) -> dict[str, str]:
    """What the server sees in the container: the image's ENV, then `docker run -e` (the port among them)."""
    state.mkdir(exist_ok=True)
    outside = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    return {**outside, **image_env, "FASTDEPLOY_STATE_DIR": str(state), "FASTDEPLOY_BATCH_SIZE": "2",
            "FASTDEPLOY_PORT": str(port)}


def test_the_image_serves_and_checks_health_on_the_port_docker_run_gives_it(tmp_path):
    # (#19 point 12) CMD said --port 8080, which wins over `docker run -e FASTDEPLOY_PORT=...`, and the
    # HEALTHCHECK probed 8080 whatever the server listened on
    recipe = tmp_path / "echo"
    shutil.copytree(RECIPES / "echo", recipe, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    assert fastdeploy_build(str(recipe), "--no-build", "--port", "9000").returncode == 0
    command, image_env, probe = _as_the_image_runs(recipe)
    port = free_port()
    env = _container_env(image_env, tmp_path / "state", port)
    with running(command, env=env, cwd=ROOT, port=port, state_dir=tmp_path / "state") as server:
        assert server.post("/sync", {"data": ["moved"]}).json()["prediction"] == ["moved"]
        assert subprocess.run(probe, env=env, cwd=ROOT, capture_output=True, timeout=30).returncode == 0  # healthy
        elsewhere = {**env, "FASTDEPLOY_PORT": str(free_port())}  # the probe follows the setting: nothing there
        assert subprocess.run(probe, env=elsewhere, cwd=ROOT, capture_output=True, timeout=30).returncode != 0
    assert image_env["FASTDEPLOY_PORT"] == "9000"  # without -e, the image serves on the port it was built for


def test_out_elsewhere_writes_a_self_contained_build_context(recipe, tmp_path):
    # (#19 point 12) --out outside the recipe was refused; now the context gets a copy of the recipe
    (recipe / ".fastdeploy").mkdir()
    (recipe / ".fastdeploy" / "store_secret").write_text("never in an image")
    (recipe / "old.txt").write_text("deleted before the second build")
    out, copy = tmp_path / "context", f"{container.DIST}/recipe"
    done = fastdeploy_build(str(recipe), "--out", str(out), "--tag", "echo:ctx", "--no-build")
    assert done.returncode == 0, done.stderr
    assert f"docker build -t echo:ctx {out}" in done.stdout
    found = steps(parsed(out))
    assert ("COPY", f"{copy} {container.RECIPE_PATH}") in found
    assert ("COPY", f"{copy}/requirements*.txt /recipe/") in found
    sent = context_files(out)
    assert {f"{copy}/predictor.py", f"{copy}/example.py", f"{copy}/requirements.txt", f"{copy}/old.txt",
            "Dockerfile", f"{container.DIST}/{own_wheel.wheel_name()}"} <= sent
    assert not (out / copy / ".fastdeploy").exists() and not [p for p in sent if ".fastdeploy/" in p]
    assert not (recipe / "Dockerfile").exists()
    (recipe / "old.txt").unlink()  # the next build copies the recipe as it is then
    assert fastdeploy_build(str(recipe), "--out", str(out), "--no-build").returncode == 0
    assert not (out / copy / "old.txt").exists() and (out / copy / "predictor.py").is_file()
    inside = recipe / "image"  # a context inside the recipe is not copied into itself
    assert fastdeploy_build(str(recipe), "--out", str(inside), "--no-build").returncode == 0
    assert (inside / copy / "predictor.py").is_file() and not (inside / copy / "image").exists()
    shutil.rmtree(recipe)  # the context holds all the image needs
    command, image_env, _ = _as_the_image_runs(out)
    port = free_port()
    env = _container_env(image_env, tmp_path / "state", port)
    with running(command, env=env, cwd=ROOT, port=port, state_dir=tmp_path / "state") as server:
        assert server.post("/sync", {"data": ["from", "the", "copy"]}).json()["prediction"] == ["from", "the", "copy"]


def test_build_refuses_with_one_line_and_leaves_other_files_alone(recipe, tmp_path):
    for args, expected in (([str(tmp_path / "missing")], "does not exist"),
                           ([str(recipe), "--port", "70000"], "--port")):
        done = fastdeploy_build(*args, "--no-build")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and expected in lines[0], done.stderr
        assert lines[0].startswith("fastdeploy: error:")
    (recipe / "Dockerfile").write_text("FROM scratch\n")  # the user's own
    done = fastdeploy_build(str(recipe), "--no-build")
    assert done.returncode == 2 and "not written by `fastdeploy build`" in done.stderr
    assert (recipe / "Dockerfile").read_text() == "FROM scratch\n"


def _assert_not_built(done: subprocess.CompletedProcess, why: str, command: str) -> None:
    """Failed, in one line saying why and how to build, after writing the files."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("fastdeploy: error: no image was built")
    assert why in lines[0] and f"`{command}`" in lines[0] and "--no-build" in lines[0], done.stderr
    assert "wrote " in done.stdout and "Traceback" not in done.stderr


def test_without_a_container_engine_answering_it_fails_naming_the_command(recipe, tmp_path):
    # (#19 point 12) it exited 0 without an image: a CI job went on to push what was never built
    (tmp_path / "empty-bin").mkdir()
    env = {**os.environ, "PATH": str(tmp_path / "empty-bin")}  # neither docker nor podman
    done = fastdeploy_build(str(recipe), "--tag", "echo:test", env=env)
    _assert_not_built(done, "neither docker nor podman is on the PATH", f"docker build -t echo:test {recipe}")
    assert (recipe / "Dockerfile").is_file()
    assert fastdeploy_build(str(recipe), "--no-build", env=env).returncode == 0  # asked only to write the files
    docker = shutil.which("docker")
    if docker is None:
        return
    (tmp_path / "docker-bin").mkdir()  # docker alone, its daemon at a socket nobody listens on
    (tmp_path / "docker-bin" / "docker").symlink_to(docker)
    env = {**os.environ, "PATH": str(tmp_path / "docker-bin"), "DOCKER_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    done = fastdeploy_build(str(recipe), env=env)
    _assert_not_built(done, "docker does not answer: ", f"docker build -t echo {recipe}")
    assert "no-daemon.sock" in done.stderr


def test_the_state_folder_stays_out_of_git_and_the_image(recipe):
    subprocess.run(["git", "init", "-q", str(recipe)], check=True)
    state = recipe / ".fastdeploy"  # the default place, which fastDeploy creates
    with serve(recipe, state_dir=state, args=["--batch-size", "4"]) as server:
        assert server.post("/sync", {"data": ["x"]}).json()["prediction"] == ["x"]
    assert (state / "jobs.sqlite3").is_file() and (state / ".gitignore").read_text() == "*\n"
    assert fastdeploy_build(str(recipe), "--no-build").returncode == 0
    listed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=recipe,
                            capture_output=True, text=True, check=True).stdout
    untracked = {line[3:] for line in listed.splitlines()}
    assert {"predictor.py", "Dockerfile", ".dockerignore"} <= untracked  # git does see new files
    assert not [p for p in untracked if p.startswith((".fastdeploy/", f"{container.DIST}/"))], untracked
    assert not [p for p in context_files(recipe) if p.split("/")[0] == ".fastdeploy"]
    with serve(recipe, args=["--batch-size", "4"]) as server:  # a state folder that already existed
        existing = server.state_dir
    assert not (existing / ".gitignore").exists()  # (helpers made it): someone else's folder is left as it is


def _install_like_the_dockerfile(context: Path, venv: Path, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Run the Dockerfile's pip steps in ``venv``, image paths mapped to the build context;
    returns the CMD and the image's ENV with paths mapped the same way."""
    paths: dict[str, Path] = {}

    def local(word: str) -> str:
        for image_path in sorted(paths, key=len, reverse=True):
            if word == image_path.rstrip("/") or word.startswith(image_path.rstrip("/") + "/"):
                return str(paths[image_path]) + word[len(image_path.rstrip("/")):]
        return word

    image_env: dict[str, str] = {}
    command: list[str] = []
    for kind, value in steps(parsed(context)):
        if kind == "COPY":
            *sources, target = json.loads(value) if value.startswith("[") else shlex.split(value)
            source = context / sources[0]
            paths[target] = source.parent if target.endswith("/") else source
        elif kind == "ENV":
            image_env.update(dict(pair.split("=", 1) for pair in shlex.split(value)))
        elif kind == "RUN":
            for part in value.split("&&"):
                words = shlex.split(part)
                if words[:2] == ["pip", "install"]:
                    done = subprocess.run([str(venv / "bin" / "python"), "-m", *words[:2], *map(local, words[2:])],
                                          capture_output=True, text=True, env=env, timeout=300)
                    assert done.returncode == 0, done.stdout + done.stderr
                else:  # the user and folder set-up the image needs; a new kind of step must be looked at here
                    assert words[0] in SYSTEM_STEPS, part
        elif kind == "CMD":
            command = [local(word) for word in json.loads(value)]
    return command, image_env


def test_what_the_dockerfile_installs_serves_in_a_fresh_venv(recipe, tmp_path):
    assert fastdeploy_build(str(recipe), "--no-build").returncode == 0
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTDEPLOY_", "PIP_NO_CACHE")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    command, image_env = _install_like_the_dockerfile(recipe, venv, env)
    # fastDeploy in the venv is the wheel's copy, not this checkout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import fastdeploy, redis; print(fastdeploy.__file__)"],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), check=True).stdout
    assert where.startswith(str(venv))
    state = tmp_path / "image-state"
    state.mkdir()  # RUN mkdir in the image
    image_env = {k: v for k, v in image_env.items() if k != "PIP_NO_CACHE_DIR"}
    port = free_port()
    assert command == ["fastdeploy", "run", str(recipe)]
    command = [str(venv / "bin" / "fastdeploy"), *command[1:]]
    # the image's environment, then `docker run -e`: the port too
    run_env = {**env, **image_env, "FASTDEPLOY_STATE_DIR": str(state), "FASTDEPLOY_BATCH_SIZE": "4",
               "FASTDEPLOY_PORT": str(port)}
    health = json.loads(next(v for k, v in steps(parsed(recipe)) if k == "HEALTHCHECK").split("CMD ", 1)[1])
    probe = [str(venv / "bin" / "python"), *health[1:]]
    with running(command, env=run_env, cwd=tmp_path, port=port, state_dir=state) as server:
        answer = requests.post(f"http://127.0.0.1:{port}/sync", json={"data": ["hello", 42]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["prediction"] == ["hello", 42], answer.text
        assert subprocess.run(probe, env=run_env, timeout=30).returncode == 0  # HEALTHCHECK: healthy
        assert "exited with code" not in server.log(), server.log()
    assert (state / "jobs.sqlite3").is_file() and not (recipe / ".fastdeploy").exists()
    assert subprocess.run(probe, env=run_env, capture_output=True, timeout=30).returncode != 0  # unhealthy once gone
    # a fastDeploy installed from the wheel (metadata from its dist-info, no pyproject.toml) packs the same wheel
    wheel = recipe / container.DIST / own_wheel.wheel_name()
    packed_here = wheel.read_bytes()
    again = subprocess.run([str(venv / "bin" / "fastdeploy"), "build", str(recipe), "--no-build"], env=env,
                           cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert wheel.read_bytes() == packed_here


@pytest.fixture
def engine() -> Iterator[str]:
    found, why_not = container.find_engine()
    if found is None:
        pytest.skip(f"no container engine here: {why_not}")
    if subprocess.run([found, "image", "inspect", BASE], capture_output=True, timeout=60).returncode != 0:
        pytest.skip(f"the base image {BASE} is not present locally (tests pull nothing): {found} pull {BASE}")
    yield found


def test_a_real_image_builds_and_serves(recipe, engine):
    tag = f"fastdeploy-test-build:{uuid.uuid4().hex[:8]}"
    name = f"fastdeploy-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        done = fastdeploy_build(str(recipe), "--tag", tag)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"built {tag}" in done.stdout
        user = subprocess.run([engine, "image", "inspect", "--format", "{{.Config.User}}", tag],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert user == f"{container.UID}:{container.UID}"
        subprocess.run([engine, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", tag], check=True,
                       capture_output=True, timeout=120)

        def ready() -> bool:
            try:
                return requests.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout=120, what="the container's /ready")
        answer = requests.post(f"http://127.0.0.1:{port}/sync", json={"data": ["in", "a", "container"]}, timeout=30)
        assert answer.json()["prediction"] == ["in", "a", "container"]
        listing = subprocess.run([engine, "exec", name, "ls", "-a", container.RECIPE_PATH],
                                 capture_output=True, text=True, check=True).stdout.split()
        assert ".fastdeploy" not in listing and "predictor.py" in listing
    finally:
        subprocess.run([engine, "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=60)
