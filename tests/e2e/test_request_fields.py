"""A request's fields are read, or refused: a misspelt option ("webhok", "priorty") is a 400 that
names it and the field it resembles, never dropped without a word (issue 19, point 9). Every field
a client may send (SPEC.md, the seed API, fdclient 3.x) keeps working, `timeout` included."""

from __future__ import annotations

import time
from typing import Any, Iterator

import httpx
import pytest

from tests.helpers import TEST_RECIPES, Server, make_file_recipe, serve

SLEEP = 1.5  # seconds the slow recipe takes per call: a job queued behind another waits that long
ENV = {"BATCH_SIZE": "1", "FD_TEST_SLEEP": str(SLEEP), "FASTDEPLOY_WEBHOOK_HOSTS": "127.0.0.1",
       "FASTDEPLOY_WEBHOOK_ATTEMPTS": "1"}


@pytest.fixture(scope="module")
def slow() -> Iterator[Server]:
    with serve(TEST_RECIPES / "slow", env=ENV) as server:
        yield server


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    recipe = make_file_recipe(tmp_path_factory.mktemp("recipes") / "sizes")
    with serve(recipe, env={"BATCH_SIZE": "4"}) as server:
        yield server


def _refused(response: Any, *words: str) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["success"] is False and "Traceback" not in body["reason"], body
    for word in words:
        assert word in body["reason"], body["reason"]
    return str(body["reason"])


@pytest.mark.parametrize("path, body, words", [
    ("/async", {"data": ["x"], "webhok": "http://127.0.0.1:9/hook"}, ["'webhok'", "did you mean 'webhook'"]),
    ("/sync", {"data": ["x"], "priorty": 1}, ["'priorty'", "did you mean 'priority'"]),
    ("/async", {"data": ["x"], "uniqueid": "mine-1"}, ["'uniqueid'", "did you mean 'unique_id'"]),
    ("/sync", {"data": ["x"], "inputs": ["y"]}, ["'inputs'", "data, priority, webhook, unique_id, timeout"]),
    ("/result", {"uniqe_id": "a"}, ["'uniqe_id'", "did you mean 'unique_id'"]),
    ("/cancel", {"uniqe_id": "a"}, ["'uniqe_id'", "did you mean 'unique_id'"]),
])
def test_an_unknown_field_is_refused_with_the_field_it_resembles(
        slow: Server, path: str, body: dict[str, Any], words: list[str]) -> None:
    _refused(slow.post(path, body), *words)


def test_result_and_cancel_ignore_other_keys_beside_a_unique_id_as_the_spec_says(slow: Server) -> None:
    """SPEC.md: /result is 400 only when unique_id is missing or not a string."""
    answer = slow.post("/result", {"unique_id": "never-sent", "wait": True})
    assert answer.status_code == 404 and answer.json()["success"] is False, answer.text
    assert slow.post("/cancel", {"unique_id": "never-sent", "force": 1}).status_code == 404


def test_a_refused_request_queues_nothing(slow: Server) -> None:
    _refused(slow.post("/async", {"data": ["x"], "unique_id": "typo-1", "webhok": "http://127.0.0.1:9/hook"}))
    assert slow.post("/result", {"unique_id": "typo-1"}).status_code == 404


def test_every_field_a_client_may_send_is_taken(slow: Server) -> None:
    """SPEC.md's keys, the seed API's (data, webhook) and /result's unique_id."""
    answer = slow.post("/sync", {"data": ["a"], "priority": 3, "webhook": None, "unique_id": "all-fields-1",
                                 "timeout": 60})
    assert answer.status_code == 200 and answer.json()["prediction"][0]["echo"] == "a", answer.text
    accepted = slow.post("/async", {"data": ["b"], "webhook": "http://127.0.0.1:9/hook", "priority": None,
                                    "unique_id": None, "timeout": None})
    assert accepted.status_code == 200, accepted.text
    assert slow.wait_result(accepted.json()["unique_id"])["status"] == "done"


def test_a_request_timeout_is_its_deadline(slow: Server) -> None:
    """`timeout` (SPEC.md): /sync answers 504 once it passes; an /async job still queued then is
    never predicted and fails as timed out. Before, the key was dropped and both were predicted."""
    blocker = slow.post("/async", {"data": ["first"]}).json()["unique_id"]  # holds the loop for SLEEP s
    late = slow.post("/async", {"data": ["late"], "timeout": 0.3}).json()["unique_id"]
    started = time.monotonic()
    waited = slow.post("/sync", {"data": ["waited"], "timeout": 0.3})
    assert waited.status_code == 504, waited.text
    assert "the request's timeout of 0.3 s" in waited.json()["reason"]
    assert time.monotonic() - started < SLEEP
    assert slow.wait_result(blocker)["status"] == "done"
    result = slow.wait_result(late)
    assert result["status"] == "failed" and "timed out" in result["reason"], result


@pytest.mark.parametrize("timeout", [0, -1, "soon", True, [5]])
def test_a_timeout_that_is_not_a_positive_number_is_refused(slow: Server, timeout: Any) -> None:
    _refused(slow.post("/sync", {"data": ["x"], "timeout": timeout}), "timeout must be a positive number")


def test_infer_takes_its_options_in_the_query_not_the_body(slow: Server) -> None:
    """3.x took {"data": [...]} as an /infer body; any other key there is refused, not ignored."""
    response = httpx.post(slow.url + "/infer?input_type=json", content=b'{"data": ["x"], "unique_id": "q-1"}')
    reason = _refused(response, "'unique_id'", "query parameters")
    assert "timeout" in reason
    ok = httpx.post(slow.url + "/infer?input_type=json&unique_id=q-2", content=b'{"data": ["x"]}', timeout=30)
    assert ok.status_code == 200 and ok.json()["unique_id"] == "q-2", ok.text


# -- multipart: every part is a file, but for the option fields ------------------------------------
def _form(server: Server, path: str, parts: list[tuple[str, Any]]) -> httpx.Response:
    return httpx.post(server.url + path, files=parts, timeout=60)


@pytest.mark.parametrize("name", ["webhok", "Priority", "uniqueid", "timout"])
def test_a_text_part_named_like_an_option_is_refused(files: Server, name: str) -> None:
    """A text part (no file name) whose name all but matches an option's was meant as that option."""
    reason = _refused(_form(files, "/async", [("a.txt", ("a.txt", b"abc")), (name, (None, b"1"))]),
                      f"{name!r}", "did you mean", "file name")
    assert not list((files.state_dir / "files").glob("*/a.txt")), reason


def test_other_parts_are_files_as_before(files: Server) -> None:
    """A file part under an option-like name (it has a file name), and a text part whose name is
    nothing like an option's, are files; the options themselves, timeout included, are read."""
    answer = _form(files, "/sync", [("webhok", ("w.bin", b"12")), ("notes", (None, b"hello")),
                                    ("priority", (None, b"2")), ("timeout", (None, b"30"))])
    assert answer.status_code == 200, answer.text
    prediction = answer.json()["prediction"]
    assert prediction["webhok"]["size"] == 2 and prediction["notes"]["size"] == 5


@pytest.mark.parametrize("value", ["0", "soon", "1e999", "-3"])
def test_a_form_timeout_that_is_not_a_positive_number_is_refused(files: Server, value: str) -> None:
    _refused(_form(files, "/sync", [("a.txt", ("a.txt", b"abc")), ("timeout", (None, value.encode()))]),
             "timeout must be a positive number")


def test_a_base64_request_refuses_unknown_fields_too(files: Server) -> None:
    _refused(files.post("/sync", {"data": {"a.txt": "YWJj"}, "priorty": 2}), "did you mean 'priority'")
