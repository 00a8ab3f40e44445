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
    "settings": {"errors"},
    "jobs": set(),
    "batching": set(),
    "rhythm": set(),
    "recipe": {"errors"},
    "payloads": {"errors"},
    "metrics": {"jobs"},
    "store.bells": set(),
    "store.base": {"errors", "jobs"},
    "store.news": {"jobs"},
    "store.sqlite": {"errors", "jobs", "store.base", "store.bells", "store.news"},
    "store.redis": {"errors", "jobs", "store.base", "store.news"},
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


def test_only_the_redis_store_imports_redis():
    for name, path in MODULES.items():
        uses_redis = any(m == "redis" or m.startswith("redis.") for m in _imports(path))
        assert uses_redis == (name == "store.redis"), name


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
