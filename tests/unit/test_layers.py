"""The dependency direction holds: HTTP -> service -> store, never back; low modules stay low."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "fastdeploy"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _ours(path: Path) -> set[str]:
    return {m.removeprefix("fastdeploy.") for m in _imports(path) if m.startswith("fastdeploy.")}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}

# what each low-level module may import from the package
ALLOWED = {
    "errors": set(),
    "logs": set(),
    "http.pages": {"errors"},
    "devices": set(),
    "settings": {"devices", "errors"},
    "jobs": set(),
    "bodies": {"jobs"},
    "batching": set(),
    "predicting": set(),
    "recipe": {"errors"},
    "payloads": {"errors"},
    "metrics": {"jobs"},
    "store.base": {"errors", "jobs"},
    "store.doorbell": {"jobs"},
    "store.news": {"jobs"},
    "store.local_doorbell": {"jobs", "store.doorbell", "store.news"},
    "store.redis_doorbell": {"jobs", "store.doorbell", "store.news", "store.redis"},
    "store.fairness": set(),
    "tasks": set(),
    "state_folder": {"errors"},
    "progress": set(),
    "own_wheel": {"errors"},
    "store.sqlite": {"bodies", "errors", "jobs", "state_folder", "store.base", "store.fairness", "store.local_doorbell",
                     "store.news"},
    "store.redis": {"bodies", "errors", "jobs", "store.base"},
    "uploads": {"errors", "jobs", "payloads", "settings"},
}


def test_low_modules_import_only_lower_ones():
    for name, allowed in ALLOWED.items():
        assert _ours(MODULES[name]) <= allowed, (name, _ours(MODULES[name]) - allowed)


def test_http_and_service_never_reach_into_loops_or_processes():
    for name, path in MODULES.items():
        if name.startswith("http.") or name in ("service", "webhooks"):
            assert not _ours(path) & {"loop", "supervisor", "cli"}, name
        if name == "service":
            assert not any(m.startswith("http") for m in _ours(path))


def test_only_the_redis_store_and_its_doorbell_import_redis():
    for name, path in MODULES.items():
        uses_redis = any(m == "redis" or m.startswith("redis.") for m in _imports(path))
        assert uses_redis == (name in ("store.redis", "store.redis_doorbell")), name


def test_the_store_contract_is_about_jobs_and_only_doorbells_poll_for_rings():
    import re

    base = (PACKAGE / "store" / "base.py").read_text().lower()
    for word in (r"\brings?\b", "wait_for", "spin", "listen", "peek", "fileno", r"\bpoll"):
        assert not re.search(word, base), word
    # the spin budget is an option (settings), handed to the doorbell when it is opened; the
    # doorbells report what they spent as a counter; nobody else knows there is such a thing
    knows = {"store.doorbell", "store.local_doorbell", "store.__init__", "settings"}
    for name, path in MODULES.items():
        if name not in knows:
            text = path.read_text().lower().replace("settings.spin_seconds", "").replace("s.spin_seconds", "")
            assert "spin" not in text and "sched_yield" not in text, name


def test_no_function_is_longer_than_sixty_lines():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                assert length <= 60, f"{name}.{node.name}: {length} lines"


# where a broad except may stand, and how many: thread and task tops, the request boundary,
# calls into user code (the predictor, its outputs, payloads it pickled, the recipe's import)
BROAD_EXCEPTS = {"http.app": 1, "store.doorbell": 1, "tasks": 1, "loop": 3, "predicting": 1, "recipe": 1,
                 "supervisor": 1}


def _is_broad(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def test_broad_excepts_only_at_boundaries():
    found: dict[str, int] = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and _is_broad(node):
                found[name] = found.get(name, 0) + 1
    # `except BaseException: <undo>; raise` (rollback, cleanup) re-raises: allowed in the stores and scratch
    for name in ("store.sqlite", "store.redis_doorbell", "scratch", "store.__init__"):
        found.pop(name, None)
    assert found == BROAD_EXCEPTS


def test_importing_the_package_does_no_work():
    import subprocess
    import sys

    code = "import sys, fastdeploy.cli, fastdeploy.http.app, fastdeploy.loop; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr == ""


def test_the_package_type_checks():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mypy", str(PACKAGE)], capture_output=True, text=True,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stdout + out.stderr
