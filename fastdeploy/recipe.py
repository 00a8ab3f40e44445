"""Find and describe a recipe folder. Only the prediction loop imports a predictor."""

from __future__ import annotations

import importlib.util
import re
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fastdeploy.errors import RecipeError

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
    try:
        namespace = runpy.run_path(str(example_file))
    except Exception as exc:  # user code: report, don't crash with a trace
        raise RecipeError(f"{example_file}: failed to run: {type(exc).__name__}: {exc}") from exc
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
