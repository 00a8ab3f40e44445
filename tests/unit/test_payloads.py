import base64

import pytest

from fastdeploy.errors import BadRequest, PayloadTooLarge
from fastdeploy.bodies import result_document
from fastdeploy.jobs import Binding, JobStatus, decode_payload, encode_inputs, encode_prediction, encode_stage_outputs
from fastdeploy.payloads import parse_request, safe_file_name, validate_webhook


@pytest.mark.parametrize("key, base", [("a.png", "a.png"), ("../../x.png", "x.png"), ("dir\\y.jpg", "y.jpg"),
                                       ("/abs/z", "z"), ("..\\..\\w.wav", "w.wav")])
def test_file_names_reduce_to_base_names(key, base):
    assert safe_file_name(key) == base


@pytest.mark.parametrize("key", ["", ".", "..", "a/", "a\\..", "x/."])
def test_names_without_a_base_are_refused(key):
    with pytest.raises(BadRequest):
        safe_file_name(key)


def test_file_request_decodes_in_key_order():
    data = {"b.txt": base64.b64encode(b"B").decode(), "a.txt": base64.b64encode(b"A").decode()}
    parsed = parse_request(b'{"data": %s}' % str(data).replace("'", '"').encode(), file_mode=True, sync=True, max_items=0)
    assert parsed.keys == ["b.txt", "a.txt"] and parsed.inputs == [["b.txt", b"B"], ["a.txt", b"A"]]
    assert parsed.priority == 8


def test_limits_and_defaults():
    with pytest.raises(PayloadTooLarge):
        parse_request(b'{"data": [1, 2, 3]}', file_mode=False, sync=False, max_items=2)
    assert parse_request(b'{"data": [1]}', file_mode=False, sync=False, max_items=0).priority == 9


def test_webhook_host_allow_list():
    assert validate_webhook("http://hooks.example/x", frozenset({"hooks.example"}))
    with pytest.raises(BadRequest, match="not allowed"):
        validate_webhook("http://10.0.0.1/x", frozenset({"hooks.example"}))


def test_payload_round_trips():
    job = Binding("j", 0, "", 1)
    assert decode_payload(encode_inputs([1, "a"], None), "", job) == ([1, "a"], None)
    assert decode_payload(encode_inputs([["a.png", b"\x00\x01"]], ["a.png"]), "", job) == ([["a.png", b"\x00\x01"]], ["a.png"])
    secret = "k" * 32
    later = Binding("j", 1, "", 1)
    assert decode_payload(encode_stage_outputs([(1, {2})], None, secret, later), secret, later) == ([(1, {2})], None)


def test_prediction_encoding():
    import numpy as np

    assert encode_prediction([np.float32(0.5), np.arange(2)], None) == b"[0.5,[0,1]]"
    assert encode_prediction([1, 2], ["a", "b"]) == b'{"a":1,"b":2}'
    with pytest.raises(TypeError):
        encode_prediction([object()], None)


def test_result_documents():
    import orjson

    assert orjson.loads(result_document("i", JobStatus.DONE, b"[1]", None)) == {
        "unique_id": "i", "status": "done", "success": True, "prediction": [1]}
    assert orjson.loads(result_document("i", JobStatus.QUEUED, None, None))["success"] is None
    assert orjson.loads(result_document("i", JobStatus.FAILED, None, 'bad "x"'))["reason"] == 'bad "x"'
