"""fastDeploy's own wheel, packed from the package that is running, for ``fastdeploy build``.

The name ``fastdeploy`` on PyPI belongs to another project, so an image cannot simply
``pip install fastdeploy==<version>``; it installs this wheel instead: the running package's
files, with the requirements of its ``pyproject.toml`` when it runs from a source tree (an
editable install, whose installed metadata goes stale) and of its installed metadata
otherwise. That needs no build backend and no network, and takes milliseconds. The bytes are
reproducible (sorted entries, fixed timestamps): an unchanged fastDeploy keeps the image's
install layer cached.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import zipfile
from pathlib import Path
from typing import Any, Iterator, Optional

import fastdeploy
from fastdeploy.errors import FastDeployError

NAME = "fastdeploy"
TAG = "py3-none-any"  # pure Python
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: the same bytes on every build


def wheel_name() -> str:
    return f"{NAME}-{fastdeploy.__version__}-{TAG}.whl"


def write_wheel(folder: Path) -> Path:
    """Write fastDeploy's wheel into ``folder`` and return its path (same bytes for the same code)."""
    dist_info = f"{NAME}-{fastdeploy.__version__}.dist-info"
    entries = sorted(_package_files())
    entries += [
        (f"{dist_info}/METADATA", _metadata().encode()),
        (f"{dist_info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: fastdeploy build\nRoot-Is-Purelib: true\n"
                               f"Tag: {TAG}\n".encode()),
        (f"{dist_info}/entry_points.txt", _entry_points().encode()),
    ]
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel_name()
    aside = path.with_name(f".{path.name}.partial")
    with zipfile.ZipFile(aside, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    aside.replace(path)
    return path


def _package_files() -> Iterator[tuple[str, bytes]]:
    """Every file of the running ``fastdeploy`` package, bytecode left out."""
    root = Path(fastdeploy.__file__).resolve().parent
    for path in root.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            yield f"{NAME}/{path.relative_to(root).as_posix()}", path.read_bytes()


def _metadata() -> str:
    """Core metadata 2.1 (what every pip reads): name, version, Python and requirements, no long description."""
    project = _source_project()
    if project is not None:
        summary, python = project.get("description", ""), project.get("requires-python", "")
        optional: dict[str, list[str]] = project.get("optional-dependencies", {})
        requires = list(project.get("dependencies", []))
        requires += [_for_extra(requirement, extra) for extra, listed in optional.items() for requirement in listed]
        extras = list(optional)
    else:
        dist = _distribution()
        fields = dist.metadata
        summary, python = ((fields.get_all(name) or [""])[0] for name in ("Summary", "Requires-Python"))
        extras, requires = fields.get_all("Provides-Extra") or [], dist.requires or []
    lines = ["Metadata-Version: 2.1", f"Name: {NAME}", f"Version: {fastdeploy.__version__}"]
    lines += [f"Summary: {summary}"] if summary else []
    lines += [f"Requires-Python: {python}"] if python else []
    lines += [f"Provides-Extra: {extra}" for extra in extras]
    lines += [f"Requires-Dist: {requirement}" for requirement in requires]
    return "\n".join(lines) + "\n"


def _entry_points() -> str:
    project = _source_project()
    if project is not None:
        scripts = project.get("scripts", {})
        return "[console_scripts]\n" + "".join(f"{name} = {value}\n" for name, value in scripts.items()) + "\n"
    points = list(_distribution().entry_points)  # a plain list on Python 3.9
    return "".join(
        f"[{group}]\n" + "".join(f"{p.name} = {p.value}\n" for p in points if p.group == group) + "\n"
        for group in sorted({p.group for p in points})
    )


def _source_project() -> Optional[dict[str, Any]]:
    """``[project]`` of the source tree the package runs from (an editable install or a checkout): the truth
    there, where installed metadata goes stale when a dependency is added; None for an installed package."""
    pyproject = Path(fastdeploy.__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib
    except ImportError:  # Python 3.9 and 3.10: the installed metadata then
        return None
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return project if project.get("name") == NAME else None


def _distribution() -> importlib.metadata.Distribution:
    """The installed metadata of the running version (requirements, entry points)."""
    for dist in importlib.metadata.distributions(name=NAME):
        if dist.version == fastdeploy.__version__ and any(p.group == "console_scripts" for p in dist.entry_points):
            return dist
    raise FastDeployError(f"cannot find the installed metadata of fastdeploy {fastdeploy.__version__}; install "
                          "fastDeploy with pip (`pip install .` or `pip install -e .`) and run the command again")


def _for_extra(requirement: str, extra: str) -> str:
    """``requirement`` (maybe with its own marker) needed only with ``extra``."""
    name, _, marker = requirement.partition(";")
    condition = f'({marker.strip()}) and extra == "{extra}"' if marker.strip() else f'extra == "{extra}"'
    return f"{name.strip()}; {condition}"


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
