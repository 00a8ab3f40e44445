"""The pieces of the log format and the start-up table on their own (the e2e tests run them for real)."""

from __future__ import annotations

import json
import logging
import re

import pytest

from fastdeploy import batching, logs
from fastdeploy.predicting import user_exc_info


@pytest.mark.parametrize("sent, kept", [
    (b"abc-123", True), (b"trace:7f3e/upstream-42", True), (b"a" * 128, True),
    (b"a" * 129, False), (b"", False), (b"two words", False), (b"caf\xc3\xa9", False), (b"a\r\nX-Evil: 1", False),
])
def test_a_client_request_id_is_kept_only_when_short_and_plain(sent, kept):
    got = logs.request_id([(b"host", b"x"), (b"x-request-id", sent)])
    assert (got == sent.decode(errors="replace")) is kept
    if not kept:
        assert re.fullmatch(r"[0-9a-f]{32}", got)
    assert logs.REQUEST_ID.get() == got


def test_a_json_line_names_role_and_the_job_and_request_it_is_about():
    record = logging.LogRecord("fastdeploy.loop", logging.WARNING, __file__, 1, "failed on %d", (3,), None)
    record.unique_id = "job-1"
    logs._Context("loop stage 2").filter(record)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["role"] == "loop stage 2" and line["unique_id"] == "job-1" and line["message"] == "failed on 3"
    assert line["level"] == "WARNING" and line["logger"] == "fastdeploy.loop" and isinstance(line["pid"], int)
    assert "request_id" not in line or line["request_id"] == logs.REQUEST_ID.get()


def test_a_text_line_says_role_pid_and_what_it_is_about():
    record = logging.LogRecord("fastdeploy.http.app", logging.INFO, __file__, 1, "hello", (), None)
    record.request_id, record.unique_id = "r-1", "u-1"
    logs._Context("api").filter(record)
    text = logs.TextFormatter().format(record)
    assert re.fullmatch(r"\S+ \S+ INFO \[api pid \d+\] fastdeploy\.http\.app: hello \[unique_id=u-1 request_id=r-1\]",
                        text), text


def test_the_batch_size_table_marks_the_choice():
    rows = batching.trial_table([(1, 0.002), (2, 0.0011), (4, 0.00000009)], 2)
    assert rows == ["batch size | ms per input",
                    "         1 |         2.00",
                    "         2 |         1.10  <- chosen",
                    "         4 |    0.0000900"]


def _predictor_that_raises(inputs: list) -> list:
    raise KeyError(inputs[0])


def test_a_predictor_traceback_starts_at_the_predictor():
    from fastdeploy.predicting import predict_requests

    seen: list[BaseException] = []
    predict_requests(_predictor_that_raises, [["a"], ["b"]], 2, on_failure=lambda i, p, exc: seen.append(exc))
    assert len(seen) == 2
    _, exc, tb = user_exc_info(seen[0])
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, tb))
    assert "_predictor_that_raises" in text and "fastdeploy/predicting.py" not in text
    assert "During handling" not in text  # the bisected batch's error is not chained to the input's
