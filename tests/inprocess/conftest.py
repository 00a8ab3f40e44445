"""Run ``Service`` and ``PredictionLoop`` inside the test process on one SQLite state folder.

``inproc`` (a ``Harness``) opens backends (each one like a separate process: its own
store connections and doorbell socket), starts loops on background threads, runs a
``Service`` in an async context, and cleans everything up after the test: loops stopped
and joined, services stopped, backends closed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional

import pytest

from fastdeploy.loop import PredictionLoop
from fastdeploy.recipe import Recipe, load_recipe
from fastdeploy.service import Service
from fastdeploy.settings import Settings, load_settings
from fastdeploy.store import Backend, open_backend
from tests.helpers import wait_until  # noqa: F401 (the tests import it from here)

DEADLINE_SECONDS = 5.0


async def async_wait_until(
    condition: Callable[[], Awaitable[Any]], timeout: float = DEADLINE_SECONDS, what: str = "condition"
) -> Any:
    """``wait_until`` for an async condition, sleeping on the event loop between tries."""
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last value: {value!r})")
        await asyncio.sleep(0.01)


class Gate:
    """A recipe (in a temp folder) whose predictor holds inputs equal to ``"hold"`` until the gate opens.

    Its predictor touches ``started`` when it begins holding and waits (at most 10 s, then
    raises) for ``gate`` to exist; other inputs come back as ``{"got": x}`` at once.
    """

    def __init__(self, folder: Path, example: list[Any]) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.started = folder / "started"
        self.gate = folder / "gate"
        (folder / "example.py").write_text(f"example = {example!r}\n")
        (folder / "predictor.py").write_text(textwrap.dedent(f"""
            import time
            from pathlib import Path

            STARTED = Path({str(self.started)!r})
            GATE = Path({str(self.gate)!r})


            def predictor(inputs, batch_size=1):
                if "hold" in inputs:
                    STARTED.touch()
                    deadline = time.monotonic() + 10
                    while not GATE.exists():
                        if time.monotonic() > deadline:
                            raise TimeoutError("the test never opened the gate")
                        time.sleep(0.002)
                return [{{"got": x}} for x in inputs]
        """))

    def open(self) -> None:
        self.gate.touch()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.state = tmp_path / "state"
        self._backends: list[Backend] = []
        self._loops: list[tuple[PredictionLoop, threading.Thread]] = []
        self._gates: list[Gate] = []
        self.loop_errors: list[BaseException] = []

    def settings(self, recipe_dir: Path, **flags: Any) -> Settings:
        values = {
            "state_dir": str(self.state),
            "heartbeat_seconds": "0.1",
            "batch_size": "4",  # fixed: no batch size search at start-up
            "spin_us": "0",
            "timeout": "10",  # a /sync that is never answered ends the test with 504, not a hang
            **{k: str(v) for k, v in flags.items()},
        }
        return load_settings(recipe_dir, values, environ={})

    def recipe(self, recipe_dir: Path) -> Recipe:
        return load_recipe(recipe_dir)

    def gate(self, name: str = "gated", example: Optional[list[Any]] = None) -> Gate:
        gate = Gate(self.tmp_path / name, example if example is not None else ["x"])
        self._gates.append(gate)
        return gate

    def backend(self, settings: Settings) -> Backend:
        backend = open_backend(settings.broker, settings.state_path, settings.spin_seconds)
        self._backends.append(backend)
        return backend

    def make_loop(
        self, settings: Settings, recipe: Recipe, stage: int = 0, worker_id: Optional[str] = None
    ) -> PredictionLoop:
        """A loop on a backend of its own, not started (tests may call ``process`` directly)."""
        backend = self.backend(settings)
        return PredictionLoop(settings, recipe, stage, worker_id or f"test-loop-{stage}-{len(self._loops)}",
                              backend.store, backend.doorbell)

    def start_loop(self, settings: Settings, recipe: Recipe, stage: int = 0, worker_id: Optional[str] = None,
                   wait_ready: bool = True) -> PredictionLoop:
        loop = self.make_loop(settings, recipe, stage, worker_id)

        def run() -> None:
            try:
                loop.run()
            except BaseException as exc:  # reported at teardown
                self.loop_errors.append(exc)

        thread = threading.Thread(target=run, name=f"loop-{loop.worker_id}", daemon=True)
        self._loops.append((loop, thread))
        thread.start()
        if wait_ready:
            wait_until(lambda: loop.ready or not thread.is_alive(), what="the loop ready")
            assert loop.ready, f"the loop ended before it was ready: {self.loop_errors}"
        return loop

    def stop_loop(self, loop: PredictionLoop) -> None:
        for candidate, thread in self._loops:
            if candidate is loop:
                loop.stop()
                thread.join(timeout=10)
                assert not thread.is_alive(), "the loop thread did not stop within 10 s"

    @asynccontextmanager
    async def service(self, settings: Settings, recipe: Recipe) -> AsyncIterator[Service]:
        backend = self.backend(settings)
        service = Service(settings, recipe, backend.store, backend.doorbell)
        await service.start()
        try:
            yield service
        finally:
            await service.stop()

    def close(self) -> None:
        for gate in self._gates:
            gate.open()  # never leave a predictor waiting
        for loop, _ in self._loops:
            loop.stop()
        stuck = []
        for loop, thread in self._loops:
            thread.join(timeout=10)
            if thread.is_alive():
                stuck.append(loop.worker_id)
        for backend in reversed(self._backends):
            backend.close()
        # load_predictor puts each recipe folder on sys.path: take the temp ones off again
        sys.path[:] = [p for p in sys.path if not p.startswith(str(self.tmp_path))]
        assert not stuck, f"loop thread(s) did not stop: {stuck}"
        assert not self.loop_errors, f"a loop thread raised: {self.loop_errors!r}"


@pytest.fixture
def inproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    # the loop sets these with setdefault; set them here so the test process's environment is restored
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    monkeypatch.delenv("FD_TEST_CRASH_MARKER", raising=False)
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()
