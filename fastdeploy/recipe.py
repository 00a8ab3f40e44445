"""Find and describe a recipe folder. Only the prediction loop imports a predictor."""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from fastdeploy.errors import FastDeployError, RecipeError

T = TypeVar("T")

INPUT_TYPES = ("json", "file")
_CHAIN_FILE = re.compile(r"^predictor_(\d+)\.py$")


@dataclass(frozen=True)
class Recipe:
    """What the API and the loops need to know about a recipe, read without importing the predictor."""

    path: Path
    name: str
    input_type: str
    example: list[Any]
    stage_files: tuple[Path, ...]

    @property
    def is_file(self) -> bool:
        return self.input_type == "file"

    @property
    def stages(self) -> int:
        return len(self.stage_files)

    def example_paths(self) -> list[str]:
        """FILE recipes: the example files as absolute paths."""
        return [str((self.path / str(p)).resolve()) for p in self.example]


def _stage_files(folder: Path) -> tuple[Path, ...]:
    chain = sorted(
        ((int(m.group(1)), p) for p in folder.iterdir() if (m := _CHAIN_FILE.match(p.name))), key=lambda t: t[0]
    )
    single = folder / "predictor.py"
    if chain and single.exists():
        raise RecipeError(f"{folder}: has both predictor.py and predictor_N.py files; keep one form")
    if chain:
        numbers = [n for n, _ in chain]
        if numbers != list(range(1, len(chain) + 1)):
            raise RecipeError(f"{folder}: chain stages must be predictor_1.py .. predictor_N.py without gaps, found {numbers}")
        return tuple(p for _, p in chain)
    if single.exists():
        return (single,)
    raise RecipeError(f"{folder}: no predictor.py (or predictor_1.py ... for a chain) in the recipe folder")


def load_recipe(folder: str | Path) -> Recipe:
    """Read example.py and list the predictor stages; raises RecipeError with the fix."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise RecipeError(f"recipe folder {path} does not exist")
    stage_files = _stage_files(path)
    example_file = path / "example.py"
    if not example_file.exists():
        raise RecipeError(f"{path}: example.py is missing; it must define example = [a few real inputs]")
    namespace = run_user_code(path, f"{example_file}: failed to run", lambda: runpy.run_path(str(example_file)))
    example = namespace.get("example")
    if not isinstance(example, (list, tuple)) or not example:
        raise RecipeError(f"{example_file}: must define example = [...] as a non-empty list of inputs")
    input_type = str(namespace.get("input_type", "json")).lower()
    if input_type not in INPUT_TYPES:
        raise RecipeError(f"{example_file}: input_type must be 'json' or 'file', not {input_type!r}")
    name = namespace.get("name", path.name)
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{example_file}: name must be a non-empty string")
    recipe = Recipe(path, name, input_type, list(example), stage_files)
    if recipe.is_file:
        missing = [p for p in recipe.example_paths() if not Path(p).is_file()]
        if missing:
            raise RecipeError(f"{example_file}: example files not found: {', '.join(missing)}")
    return recipe


def load_predictor(recipe: Recipe, stage: int) -> Callable[..., Any]:
    """Import one stage's predictor function (in the loop process only)."""
    file = recipe.stage_files[stage]
    if str(recipe.path) not in sys.path:
        sys.path.insert(0, str(recipe.path))
    module_name = f"fastdeploy_recipe_stage_{stage}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise RecipeError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    predictor = getattr(module, "predictor", None)
    if not callable(predictor):
        raise RecipeError(f"{file}: must define a function predictor(inputs, batch_size=1)")
    return predictor


class StartupFailed(RecipeError):
    """The recipe's own code failed (example.py, or a predictor's import or warm-up): a restart would too."""


def run_user_code(folder: Path, what: str, call: Callable[[], T]) -> T:
    """Run the recipe's own code; whatever it raises becomes one line (``what``: its error, file and line),
    so the operator reads the predictor's error, not a page of fastDeploy's frames."""
    try:
        return call()
    except Exception as exc:  # the recipe's code may raise anything: told in one line, never a trace
        raise StartupFailed(f"{what}: {describe_user_error(exc, folder)}") from exc


def describe_user_error(exc: BaseException, folder: Path) -> str:
    """``Type: message (file, line N)``, the place being the innermost one in the recipe's own files."""
    if isinstance(exc, FastDeployError):
        return exc.reason  # ours already says what to fix
    if type(exc).__module__.startswith("fastdeploy."):
        return str(exc)  # fastDeploy's verdict on what the predictor did (e.g. returned a dict)
    if isinstance(exc, SyntaxError):  # its place is where the parser stopped, not a frame
        text, place = (exc.msg or "").strip(), _place(folder, exc.filename, exc.lineno)
    else:
        text = str(exc).strip()
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if _relative(folder, f.filename)]
        place = _place(folder, frames[-1].filename, frames[-1].lineno) if frames else ""
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{described} ({place})" if place else described


def _relative(folder: Path, filename: Optional[str]) -> Optional[Path]:
    """``filename`` relative to the recipe folder; None when it lies outside (a library, fastDeploy)."""
    if not filename:
        return None
    try:
        return Path(filename).resolve().relative_to(folder.resolve())
    except ValueError:
        return None


def _place(folder: Path, filename: Optional[str], line: Optional[int]) -> str:
    relative = _relative(folder, filename)
    if relative is None:
        return ""
    return f"{relative}, line {line}" if line else str(relative)
