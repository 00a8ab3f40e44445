"""The recipe's example in /openapi.json (what "Try it out" on /docs sends): there when it can be
a request's data, left out (never a 500) when it cannot."""

from __future__ import annotations

from pathlib import Path

from fastdeploy.http.openapi import EXAMPLE_BYTES, openapi_document
from fastdeploy.recipe import load_recipe


def _recipe(folder: Path, example: str, input_type: str = "json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictor.py").write_text("def predictor(inputs, batch_size=1):\n    return inputs\n")
    (folder / "example.py").write_text(f"input_type = {input_type!r}\n{example}\n")
    return folder


def _example(folder: Path) -> object:
    body = openapi_document(load_recipe(folder))["paths"]["/sync"]["post"]["requestBody"]["content"]
    return body["application/json"].get("example")


def test_a_json_example_is_the_request_example(tmp_path: Path) -> None:
    assert _example(_recipe(tmp_path / "r", 'example = ["hello", {"a": 1}]')) == {"data": ["hello", {"a": 1}]}


def test_an_example_that_is_not_json_or_too_large_is_left_out(tmp_path: Path) -> None:
    assert _example(_recipe(tmp_path / "set", "example = [{1, 2}]")) is None
    assert _example(_recipe(tmp_path / "big", f"example = ['x' * {EXAMPLE_BYTES + 1}]")) is None


def test_file_examples_travel_as_base64_and_large_ones_are_left_out(tmp_path: Path) -> None:
    small = _recipe(tmp_path / "small", 'example = ["a.txt"]', "file")
    (small / "a.txt").write_bytes(b"hi")
    assert _example(small) == {"data": {"a.txt": "aGk="}}
    big = _recipe(tmp_path / "large", 'example = ["a.bin"]', "file")
    (big / "a.bin").write_bytes(b"\0" * (EXAMPLE_BYTES + 1))
    assert _example(big) is None
    form = openapi_document(load_recipe(small))["paths"]["/async"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form and "webhook" in form["multipart/form-data"]["schema"]["properties"]
