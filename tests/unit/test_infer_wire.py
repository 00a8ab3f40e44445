"""/infer builds its answer once from the wait's outcome (issue #25, point 5): the prediction's JSON
bytes go into a JSON answer as they are, without being parsed back; msgpack and pickle answers
decode the prediction alone, once; a FILE recipe's outputs come back in input order."""

from __future__ import annotations

import json
import pickle

import msgpack
import orjson
import pytest

from fastdeploy.http import infer
from fastdeploy.service import SyncOutcome

RESULT = b'[1,"two",{"three":[3.25]}]'


@pytest.fixture
def counted_loads(monkeypatch):
    calls: list[bytes] = []
    real = orjson.loads

    def loads(data):  # type: ignore[no-untyped-def]
        calls.append(bytes(data))
        return real(data)

    monkeypatch.setattr(infer.orjson, "loads", loads)
    return calls


def test_a_json_answer_carries_the_prediction_bytes_without_parsing_them(counted_loads):
    wire = infer.Wire.from_query(b"input_type=json&compressed=false")
    status, body, media_type = wire.answer(SyncOutcome(200, "job-1", result=RESULT), None)
    assert (status, media_type) == (200, "application/json")
    assert RESULT in body and counted_loads == []
    assert json.loads(body) == {"success": True, "unique_id": "job-1", "prediction": json.loads(RESULT),
                                "reason": None}


@pytest.mark.parametrize("input_type, decode", [("msgpack", msgpack.unpackb), ("pickle", pickle.loads)])
def test_other_wires_decode_the_prediction_alone_once(counted_loads, input_type, decode):
    wire = infer.Wire.from_query(f"input_type={input_type}&compressed=false".encode())
    status, body, _ = wire.answer(SyncOutcome(200, "job-1", result=RESULT), None)
    assert status == 200 and counted_loads == [RESULT]
    assert decode(body)["prediction"] == [1, "two", {"three": [3.25]}]


def test_file_outputs_come_back_in_input_order(counted_loads):
    wire = infer.Wire.from_query(b"input_type=json&compressed=false")
    _, body, _ = wire.answer(SyncOutcome(200, "j", result=b'{"b.txt":2,"a.txt":1}'), ["a.txt", "b.txt"])
    assert json.loads(body)["prediction"] == [1, 2]


def test_failures_and_timeouts_keep_the_3x_statuses():
    wire = infer.Wire.from_query(b"input_type=json&compressed=false")
    status, body, _ = wire.answer(SyncOutcome(504, "j", reason="no prediction within 5 s"), None)
    assert status == 500 and json.loads(body)["reason"] == "no prediction within 5 s"
    status, body, _ = wire.answer(SyncOutcome(500, "j", reason="boom"), None)
    assert (status, json.loads(body)["success"]) == (500, False)
