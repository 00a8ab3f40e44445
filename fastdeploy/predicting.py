"""Predict many requests' inputs in shared batches, failing only the requests whose inputs fail.

A pure function of a predictor and the inputs (no store, no files, no logging), so the
batching, bisecting and mapping of failures back to requests can be tested on their own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Sequence

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep  # fastDeploy's own source files


class PredictorOutputError(Exception):
    """The predictor returned something fastDeploy cannot hand back."""


def check_outputs(outputs: object, n_inputs: int) -> list[Any]:
    """One output per input, as a list; anything else is refused with a reason the user can act on.

    Iterables whose iteration would silently give the wrong outputs (a dict's keys, a
    string's characters, a set's arbitrary order) are refused rather than trusted.
    """
    if type(outputs) is list and len(outputs) == n_inputs:  # the common case, checked cheaply
        return outputs
    name = type(outputs).__name__
    what = f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"
    if outputs is None:
        raise PredictorOutputError("the predictor returned None; it must return a list with one output per input")
    if isinstance(outputs, (Mapping, Set, str, bytes, bytearray)) or not (
        isinstance(outputs, Iterable) or (hasattr(outputs, "__len__") and hasattr(outputs, "__getitem__"))
    ):
        raise PredictorOutputError(f"the predictor returned {what}; it must return a list with one output per input")
    result = list(outputs)  # type: ignore[call-overload]  # a generator is consumed here
    if len(result) != n_inputs:
        noun = "input" if n_inputs == 1 else "inputs"
        raise PredictorOutputError(
            f"the predictor returned {len(result)} outputs for {n_inputs} {noun}; it must return one per input"
        )
    return result


@dataclass(frozen=True)
class RequestResult:
    outputs: Optional[list[Any]]  # one per input of the request, in order; None when it failed
    failure: Optional[str]  # reason a person can act on; None when it succeeded


def describe(exc: BaseException) -> str:
    """``TypeName: message``, or just the type name when the message is empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def user_exc_info(exc: BaseException) -> tuple[type[BaseException], BaseException, Optional[TracebackType]]:
    """``exc_info`` that logs a predictor's error with its own frames: fastDeploy's (the batching
    and the loop that called the predictor) are left off the top of the traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE):
        tb = tb.tb_next
    return type(exc), exc, tb


def predict_requests(
    predict: Callable[[list[Any]], object],
    requests: Sequence[Sequence[Any]],
    batch_size: int,
    on_call: Optional[Callable[[int, float], None]] = None,
    on_failure: Optional[Callable[[int, int, BaseException], None]] = None,
) -> list[RequestResult]:
    """Predict every request's inputs in calls of at most ``batch_size`` inputs.

    Small requests share a call and big ones are split across calls, so the predictor
    sees full batches. A failing call is bisected so only the requests holding a failing
    input fail. ``on_call`` is told (inputs, seconds) per successful call, ``on_failure``
    (request index, input position, exception) once per failed request.
    """
    run = _Run(predict, requests, on_call, on_failure)
    size = max(1, batch_size)
    for first in range(0, len(run.flat), size):
        run.predict_range(list(range(first, min(len(run.flat), first + size))))
    ends = run.starts[1:] + [len(run.flat)]
    return [
        RequestResult(None, run.failures[i]) if i in run.failures else RequestResult(run.results[start:end], None)
        for i, (start, end) in enumerate(zip(run.starts, ends))
    ]


class _Run:
    """The state of one predict_requests call: flat inputs, their owners, results so far."""

    def __init__(
        self,
        predict: Callable[[list[Any]], object],
        requests: Sequence[Sequence[Any]],
        on_call: Optional[Callable[[int, float], None]],
        on_failure: Optional[Callable[[int, int, BaseException], None]],
    ) -> None:
        self.predict = predict
        self.on_call = on_call
        self.on_failure = on_failure
        self.flat: list[Any] = []
        self.owners: list[int] = []  # request index of each flat input
        self.starts: list[int] = []  # first flat index of each request
        for index, inputs in enumerate(requests):
            self.starts.append(len(self.flat))
            self.flat.extend(inputs)
            self.owners.extend([index] * (len(self.flat) - self.starts[-1]))
        self.results: list[Any] = [None] * len(self.flat)
        self.failures: dict[int, str] = {}  # request index -> reason

    def predict_range(self, indices: list[int]) -> None:
        """Predict flat[indices], skipping failed requests; on an error bisect down to single inputs."""
        live = [i for i in indices if self.owners[i] not in self.failures]
        if not live:
            return
        t0 = time.perf_counter()
        try:
            outputs = check_outputs(self.predict([self.flat[i] for i in live]), len(live))
        except Exception as exc:  # the predictor is user code: contain whatever it raises
            failure: Optional[Exception] = exc
        else:
            failure = None
        if failure is not None:  # bisected outside the except: a half's error is not chained to this one
            if len(live) == 1:
                self._fail(live[0], failure)
                return
            half = len(live) // 2
            self.predict_range(live[:half])
            self.predict_range(live[half:])
            return
        if self.on_call is not None:
            self.on_call(len(live), time.perf_counter() - t0)
        for i, output in zip(live, outputs):
            self.results[i] = output

    def _fail(self, flat_index: int, exc: BaseException) -> None:
        owner = self.owners[flat_index]
        position = flat_index - self.starts[owner]
        self.failures[owner] = f"the predictor failed on input {position} of this request: {describe(exc)}"
        if self.on_failure is not None:
            self.on_failure(owner, position, exc)
