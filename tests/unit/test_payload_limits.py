"""Client input that used to pass validation and fail later (a 500 or a failed job) is refused
at submit with a reason (issue #12, points 5 and 9)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from fastdeploy.errors import BadRequest
from fastdeploy.http.openapi import openapi_document
from fastdeploy.payloads import (
    MAX_FILE_NAME_BYTES,
    MAX_JSON_DEPTH,
    nested_deeper_than,
    parse_json_body,
    parse_request,
    safe_file_name,
)
from fastdeploy.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _nested(depth: int, leaf: Any = 1, kind: str = "list") -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_depth_is_counted_in_containers(kind):
    assert not nested_deeper_than(_nested(5, kind=kind), 5)
    assert nested_deeper_than(_nested(6, kind=kind), 5)
    assert not nested_deeper_than(1, 0) and not nested_deeper_than("[[[[", 0)
    assert not nested_deeper_than([], 1) and nested_deeper_than([[]], 1)


def test_depth_of_wide_and_mixed_values():
    wide = [list(range(1000)) for _ in range(100)]  # many containers, shallow
    assert not nested_deeper_than(wide, 2) and nested_deeper_than(wide, 1)
    mixed = {"a": [1, {"b": [2, [3]]}], "c": "x"}  # depth 5 along one branch only
    assert not nested_deeper_than(mixed, 5) and nested_deeper_than(mixed, 4)


def _depth(value: Any) -> int:
    """The reference: recursive, for small values only."""
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


def test_depth_agrees_with_a_recursive_count_on_random_values():
    import random

    rnd = random.Random(12)

    def make(level: int) -> Any:
        roll = rnd.random()
        if level > 7 or roll < 0.3:
            return rnd.choice([1, 2.5, None, True, "[{", ""])
        if roll < 0.65:
            return [make(level + 1) for _ in range(rnd.randint(0, 4))]
        return {str(i): make(level + 1) for i in range(rnd.randint(0, 4))}

    for _ in range(2000):
        value = make(0)
        depth = _depth(value)
        assert not nested_deeper_than(value, depth) and (depth == 0 or nested_deeper_than(value, depth - 1))
    mixed_level = [[1], {"k": [2]}, [[3]], {"j": 4}]
    assert _depth(mixed_level) == 3 and not nested_deeper_than(mixed_level, 3) and nested_deeper_than(mixed_level, 2)


def test_a_very_deep_value_needs_no_recursion():
    assert nested_deeper_than(_nested(100_000), MAX_JSON_DEPTH)  # would overflow a recursive walk


def _body(depth_of_input: int) -> bytes:
    """A body whose one input nests ``depth_of_input`` arrays (the body object and data add 2 levels);
    written by hand: orjson writes at most 254 levels."""
    return b'{"data": [' + b"[" * depth_of_input + b"1" + b"]" * depth_of_input + b"]}"


def test_the_body_may_nest_up_to_the_bound():
    parse_json_body(_body(MAX_JSON_DEPTH - 2))
    with pytest.raises(BadRequest) as refused:
        parse_json_body(_body(MAX_JSON_DEPTH - 1))
    assert f"{MAX_JSON_DEPTH} levels" in refused.value.reason


@pytest.mark.parametrize("depth", [254, 300, 1000])
def test_deep_json_that_the_parser_takes_is_refused(depth):
    with pytest.raises(BadRequest, match="levels deep"):
        parse_request(_body(depth), file_mode=False, sync=True, max_items=0)


def test_json_deeper_than_the_parser_takes_is_a_bad_request_too():
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json_body(b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}")


def test_brackets_inside_strings_do_not_count():
    body = orjson.dumps({"data": ["[" * 500, "{" * 500]})
    assert parse_json_body(body)["data"][0] == "[" * 500


def test_file_names_up_to_255_bytes_are_kept():
    name = "a" * (MAX_FILE_NAME_BYTES - 4) + ".png"
    assert safe_file_name("some/dir/" + name) == name  # path parts do not count
    assert safe_file_name("é" * 127) == "é" * 127  # 254 bytes


@pytest.mark.parametrize("name", ["a" * 256, "x" * 300 + ".wav", "é" * 128, "dir/" + "b" * 1000])
def test_longer_file_names_are_refused_without_echoing_them_whole(name):
    with pytest.raises(BadRequest) as refused:
        safe_file_name(name)
    reason = refused.value.reason
    assert f"at most {MAX_FILE_NAME_BYTES} bytes" in reason
    assert len(reason) < 250 and "/" not in reason


def test_a_long_file_name_is_refused_at_submit():
    body = orjson.dumps({"data": {"y" * 300 + ".png": "AAAA"}})
    with pytest.raises(BadRequest, match="bytes long"):
        parse_request(body, file_mode=True, sync=False, max_items=0)


def _parsed(**fields: Any) -> Any:
    return parse_request(orjson.dumps({"data": [1], **fields}), file_mode=False, sync=False, max_items=0)


def test_integral_float_priorities_are_integers():
    assert _parsed(priority=6.0).priority == 6
    assert isinstance(_parsed(priority=0.0).priority, int)
    assert _parsed(priority=3).priority == 3


@pytest.mark.parametrize("priority", [6.5, 9.000001, 10.0, -1.0, True, "6", 1e300])
def test_other_priorities_are_refused(priority):
    with pytest.raises(BadRequest, match="whole number from 0"):
        _parsed(priority=priority)


def test_null_means_not_given():
    parsed = _parsed(priority=None, webhook=None)
    assert parsed.priority == 9 and parsed.webhook is None
    sync = parse_request(b'{"data": [1], "priority": null, "webhook": null}', file_mode=False, sync=True, max_items=0)
    assert sync.priority == 8 and sync.webhook is None


@pytest.mark.parametrize("recipe", ["echo", "image_info"])
def test_the_schema_says_what_the_code_takes(recipe):
    paths = openapi_document(load_recipe(RECIPES / recipe))["paths"]
    for endpoint in ("/sync", "/async"):
        properties = paths[endpoint]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert properties["priority"]["type"] == ["integer", "null"]
        assert "6.5" in properties["priority"]["description"]
    async_body = paths["/async"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert async_body["properties"]["webhook"]["type"] == ["string", "null"]
