"""predict_requests against fake predictors: batching, bisecting, mapping failures to requests."""

import time
from typing import Any

import pytest

from fastdeploy.predicting import PredictorOutputError, RequestResult, check_outputs, predict_requests


class Doubler:
    """Doubles each input, records every call's inputs, raises on the inputs named bad."""

    def __init__(self, bad: tuple[Any, ...] = ()) -> None:
        self.bad = bad
        self.calls: list[list[Any]] = []

    def __call__(self, inputs: list[Any]) -> list[Any]:
        self.calls.append(list(inputs))
        for x in inputs:
            if x in self.bad:
                raise ValueError(f"bad input {x}")
        return [2 * x for x in inputs]


def ok(*outputs: Any) -> RequestResult:
    return RequestResult(list(outputs), None)


def test_requests_are_split_and_reassembled_in_calls_of_at_most_batch_size():
    predictor = Doubler()
    requests = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13]]
    results = predict_requests(predictor, requests, batch_size=3)
    assert results == [ok(2, 4, 6, 8, 10), ok(12), ok(14, 16, 18, 20, 22, 24, 26)]
    assert [len(c) for c in predictor.calls] == [3, 3, 3, 3, 1]
    assert predictor.calls[1] == [4, 5, 6]  # the end of one request and a small one share a call


def test_small_requests_share_one_call():
    predictor = Doubler()
    results = predict_requests(predictor, [[1], [2, 3], [4]], batch_size=8)
    assert results == [ok(2), ok(4, 6), ok(8)]
    assert predictor.calls == [[1, 2, 3, 4]]


def test_one_bad_input_fails_only_its_request():
    predictor = Doubler(bad=(5,))
    requests = [[1, 2], [3, 4, 5, 6], [7], [8, 9]]
    results = predict_requests(predictor, requests, batch_size=8)  # all in one first call
    assert results[1] == RequestResult(None, "the predictor failed on input 2 of this request: ValueError: bad input 5")
    # requests that shared the failing call with it still get their outputs
    assert results[0] == ok(2, 4)
    assert results[2] == ok(14)
    assert results[3] == ok(16, 18)


def test_a_failed_request_is_not_predicted_further():
    predictor = Doubler(bad=(11,))
    results = predict_requests(predictor, [[10, 11, 12, 13]], batch_size=4)
    assert results == [RequestResult(None, "the predictor failed on input 1 of this request: ValueError: bad input 11")]
    # bisected down to the bad input; 12 and 13 were skipped once the request had failed
    assert predictor.calls == [[10, 11, 12, 13], [10, 11], [10], [11]]


def test_two_bad_inputs_in_two_requests():
    predictor = Doubler(bad=(2, 7))
    requests = [[1, 2, 3], [4, 5], [6, 7], [8]]
    results = predict_requests(predictor, requests, batch_size=4)
    assert results == [
        RequestResult(None, "the predictor failed on input 1 of this request: ValueError: bad input 2"),
        ok(8, 10),
        RequestResult(None, "the predictor failed on input 1 of this request: ValueError: bad input 7"),
        ok(16),
    ]


def test_the_first_failing_input_of_a_request_gives_the_reason():
    predictor = Doubler(bad=(3, 4))
    results = predict_requests(predictor, [[1, 2, 3, 4]], batch_size=4)
    assert results[0].failure == "the predictor failed on input 2 of this request: ValueError: bad input 3"
    assert [4] not in predictor.calls


def test_an_exception_without_a_message_is_named_by_its_type():
    def predictor(inputs: list[Any]) -> list[Any]:
        if "x" in inputs:
            raise KeyError()
        return inputs

    results = predict_requests(predictor, [["a"], ["b", "x"]], batch_size=2)
    assert results == [ok("a"), RequestResult(None, "the predictor failed on input 1 of this request: KeyError")]


def test_a_predictor_that_always_returns_the_wrong_count_fails_every_request():
    def predictor(inputs: list[Any]) -> list[Any]:
        return list(inputs) + [None]

    results = predict_requests(predictor, [[1, 2], [3]], batch_size=4)
    reason = (
        "the predictor failed on input 0 of this request: PredictorOutputError: "
        "the predictor returned 2 outputs for 1 input; it must return one per input"
    )
    assert results == [RequestResult(None, reason), RequestResult(None, reason)]


def test_a_wrong_count_on_big_calls_only_is_recovered_by_bisecting():
    calls: list[int] = []

    def predictor(inputs: list[Any]) -> list[Any]:
        calls.append(len(inputs))
        return [x + 1 for x in inputs][:2]  # drops outputs beyond the second

    results = predict_requests(predictor, [[1, 2, 3], [4, 5]], batch_size=5)
    assert results == [ok(2, 3, 4), ok(5, 6)]
    assert calls == [5, 2, 3, 1, 2]


def test_a_dict_of_the_right_length_is_refused_not_taken_as_keys():
    results = predict_requests(lambda inputs: {x: x for x in inputs}, [[1, 2], [3]], batch_size=4)
    reason = (
        "the predictor failed on input 0 of this request: PredictorOutputError: "
        "the predictor returned a dict; it must return a list with one output per input"
    )
    assert results == [RequestResult(None, reason), RequestResult(None, reason)]


def test_none_is_refused():
    results = predict_requests(lambda inputs: None, [[1]], batch_size=1)
    assert results[0].outputs is None
    assert results[0].failure is not None
    assert "the predictor returned None" in results[0].failure


def test_a_generator_tuple_or_numpy_array_is_accepted():
    assert predict_requests(lambda xs: (x * 3 for x in xs), [[1, 2], [3]], 2) == [ok(3, 6), ok(9)]
    assert predict_requests(lambda xs: tuple(-x for x in xs), [[1], [2, 3]], 2) == [ok(-1), ok(-2, -3)]


def test_a_numpy_array_is_accepted():
    np = pytest.importorskip("numpy")
    results = predict_requests(lambda xs: np.asarray(xs) * 10, [[1, 2, 3], [4]], batch_size=2)
    assert [r.failure for r in results] == [None, None]
    assert results[0].outputs == [10, 20, 30]
    assert results[1].outputs == [40]
    rows = predict_requests(lambda xs: np.zeros((len(xs), 3)), [[1, 2]], batch_size=2)[0].outputs
    assert rows is not None and [row.shape for row in rows] == [(3,), (3,)]


def test_check_outputs_refuses_what_cannot_be_handed_back():
    assert check_outputs([1, 2], 2) == [1, 2]
    assert check_outputs(iter("ab"), 2) == ["a", "b"]
    cases = {
        None: "the predictor returned None; it must return a list with one output per input",
        "ab": "the predictor returned a str; it must return a list with one output per input",
        b"ab": "the predictor returned a bytes; it must return a list with one output per input",
        7: "the predictor returned an int; it must return a list with one output per input",
    }
    for outputs, message in cases.items():
        with pytest.raises(PredictorOutputError) as caught:
            check_outputs(outputs, 2)
        assert str(caught.value) == message
    with pytest.raises(PredictorOutputError, match="returned a dict;"):
        check_outputs({"a": 1, "b": 2}, 2)
    with pytest.raises(PredictorOutputError, match="returned a set;"):
        check_outputs({1, 2}, 2)  # its order is arbitrary: outputs would be matched to the wrong inputs
    with pytest.raises(PredictorOutputError) as caught:
        check_outputs([1, 2, 3], 4)
    assert str(caught.value) == "the predictor returned 3 outputs for 4 inputs; it must return one per input"


def test_on_call_sees_each_successful_call():
    predictor = Doubler(bad=(5,))
    seen: list[tuple[int, float]] = []

    def slow(inputs: list[Any]) -> list[Any]:
        time.sleep(0.002)
        return predictor(inputs)

    requests = [[1, 2, 3], [4, 5, 6], [7, 8]]
    results = predict_requests(slow, requests, batch_size=4, on_call=lambda n, s: seen.append((n, s)))
    # [1,2,3,4] ok; [5,6,7,8] fails -> [5,6] fails -> [5] fails (request 1 done) -> [6] skipped -> [7,8] ok
    assert [n for n, _ in seen] == [4, 2]
    assert all(isinstance(s, float) and s >= 0.002 for _, s in seen)
    assert sum(n for n, _ in seen) == 6  # every input the predictor answered, including request 1's first
    assert [r.outputs for r in results] == [[2, 4, 6], None, [14, 16]]


def test_on_failure_is_told_once_per_failed_request():
    failures: list[tuple[int, int, str]] = []
    predictor = Doubler(bad=(2, 3, 8))
    requests = [[1, 2, 3], [4], [5, 6, 7, 8]]
    results = predict_requests(
        predictor, requests, batch_size=2, on_failure=lambda r, p, e: failures.append((r, p, str(e)))
    )
    assert failures == [(0, 1, "bad input 2"), (2, 3, "bad input 8")]
    assert [r.failure is None for r in results] == [False, True, False]
    assert results[1] == ok(8)


def test_no_requests_and_requests_without_inputs():
    predictor = Doubler()
    assert predict_requests(predictor, [], batch_size=4) == []
    assert predict_requests(predictor, [[], [1], []], batch_size=4) == [ok(), ok(2), ok()]
    assert predict_requests(predictor, [[]], batch_size=4) == [ok()]
    assert predictor.calls == [[1]]  # no call for empty requests


def test_a_batch_size_below_one_is_treated_as_one():
    predictor = Doubler()
    assert predict_requests(predictor, [[1, 2], [3]], batch_size=0) == [ok(2, 4), ok(6)]
    assert predictor.calls == [[1], [2], [3]]
