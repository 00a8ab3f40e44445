"""The prediction loop: claim queued jobs, run one stage's predictor in batches, record outcomes.

One loop process serves one stage. It warms up on the recipe's example, measures its
batch size, then repeatedly claims jobs (across requests) up to that size and predicts
them (``predicting``: split, bisect, failures mapped back to requests), and reports
itself with a heartbeat that also extends its leases. Its doorbell wakes it when jobs
arrive.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fastdeploy import batching, logs, progress, store_secret, uploads
from fastdeploy.errors import FastDeployError
from fastdeploy.jobs import (
    BATCH_BUCKETS,
    Binding,
    ClaimedJob,
    Outcome,
    UntrustedPayload,
    WorkerInfo,
    decode_payload,
    encode_prediction,
    encode_stage_outputs,
    is_job_id,
)
from fastdeploy.predicting import RequestResult, check_outputs, describe, predict_requests, user_exc_info
from fastdeploy.recipe import Recipe, load_predictor, run_user_code
from fastdeploy.scratch import Scratch
from fastdeploy.settings import Settings
from fastdeploy.store.base import Store
from fastdeploy.store.doorbell import Doorbell

log = logging.getLogger(__name__)

IDLE_POLL_SECONDS = 0.25  # fallback poll when no ring arrives
ARRIVAL_GAP_SECONDS = 0.002  # a fuller batch is waited for only while requests keep arriving
MIN_FILL_WAIT_SECONDS = 0.0005  # shorter fill waits are skipped
RHYTHM_SECONDS = 0.05  # work arriving this soon after a batch counts as load, not a lone request
# why a start-up stops when the example's outputs cannot travel the way a request's would
_NOT_JSON = ("its output cannot be encoded as JSON, the form of every answer (return str, int, float, bool, None, "
             "lists, dicts or numpy arrays)")
_NOT_PICKLED = ("its output cannot be pickled for the next stage (return what pickle can copy: no generators, "
                "lambdas, locks or open files)")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass
class LoopStats:
    """Counters reported with every heartbeat; the API turns them into Prometheus metrics."""

    batches: int = 0
    items: int = 0
    failed_jobs: int = 0
    predict_seconds: float = 0.0
    batch_buckets: list[int] = field(default_factory=lambda: [0] * len(BATCH_BUCKETS))
    batch_sum: int = 0

    def record_call(self, size: int, seconds: float) -> None:
        self.batches += 1
        self.items += size
        self.batch_sum += size
        self.predict_seconds += seconds
        for i, bound in enumerate(BATCH_BUCKETS):
            if size <= bound:
                self.batch_buckets[i] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "failed_jobs": self.failed_jobs,
            "predict_seconds": self.predict_seconds,
            "batch_buckets": list(self.batch_buckets),
            "batch_sum": self.batch_sum,
        }


def apply_thread_limit(default_threads: int) -> int:
    """Set BLAS / OpenMP thread counts before the predictor imports its libraries.

    A user's own OMP_NUM_THREADS wins; otherwise each loop gets cores / loop processes, so
    several loops on a small machine do not fight over the same cores.
    """
    threads = int(os.environ.get("OMP_NUM_THREADS") or default_threads)
    for name in _THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    return threads


def _limit_torch_threads(threads: int) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.set_num_threads(threads)
        except (RuntimeError, AttributeError) as exc:
            log.warning("could not set torch threads: %s", exc)


class PredictionLoop:
    """Serves one stage of a recipe from the store until asked to stop."""

    def __init__(
        self, settings: Settings, recipe: Recipe, stage: int, worker_id: str, store: Store, doorbell: Doorbell
    ) -> None:
        self.settings = settings
        self.recipe = recipe
        self.stage = stage
        self.worker_id = worker_id
        self.store = store
        self.doorbell = doorbell
        self.stats = LoopStats()
        self.batch_size = max(1, settings.batch_size or 1)
        self.seconds_per_item = 0.0
        self.trials: tuple[tuple[int, float], ...] = ()  # (batch size, seconds per input) measured at start-up
        self.ready = False
        self._stop = threading.Event()
        self._recorder = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="record")
        self._recording: Optional[concurrent.futures.Future[None]] = None
        self._predictor: Optional[Callable[..., Any]] = None
        self._is_last = stage == recipe.stages - 1
        self._secret: Optional[str] = None  # signs and checks stage payloads; looked up once
        self._file_stage = recipe.is_file and stage == 0
        self._scratch: Optional[Scratch] = None
        self._files_root = uploads.files_root(settings) if self._file_stage else None
        self._uploaded: set[str] = set()  # jobs predicted from their upload folder: deleted once recorded
        self._heartbeat_failure = ""  # why the last heartbeat failed ("" when it did not)
        # the device the supervisor placed this loop on, for /meta, /metrics and the status page
        self._device = os.environ.get("FASTDEPLOY_DEVICE") or "cpu"

    # -- lifecycle ------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def run(self) -> None:
        """Load, warm up, measure, then serve until stopped. Leaves no job leased behind."""
        self.doorbell.listen_for_jobs(self.stage)
        heartbeat = threading.Thread(target=self._heartbeat_forever, name="heartbeat", daemon=True)
        heartbeat.start()
        started = time.monotonic()
        try:
            self._load()
            if self._stop.is_set():
                return
            self.ready = True
            self._send_heartbeat()
            log.info("stage %d ready in %.1f s: batch size %d, %s ms per input", self.stage,
                     time.monotonic() - started, self.batch_size, batching.milliseconds(self.seconds_per_item))
            self._serve()
        finally:
            self._recorder.shutdown(wait=True)  # outcomes first, then let go of the jobs
            if self._scratch is not None:
                self._scratch.close()
            self._stop.set()
            heartbeat.join(timeout=5)
            try:
                self.store.release_worker(self.worker_id)
            except FastDeployError as exc:  # the store is down: the leases requeue the jobs instead
                log.warning("could not release this loop's jobs: %s", exc.reason)

    def _load(self) -> None:
        """Import the predictor and warm it up; an error of the recipe's own code raises
        StartupFailed with its one-line reason (the supervisor stops the service at start-up)."""
        loops_here = max(1, self.settings.replicas * self.recipe.stages)
        threads = apply_thread_limit(self.settings.threads or max(1, (os.cpu_count() or 1) // loops_here))
        name = f"the predictor of stage {self.stage} ({self.recipe.stage_files[self.stage].name})"
        log.info("importing %s", name)
        importing = time.perf_counter()
        with progress.reported(f"importing {name}", log):  # a slow import is not a silent one
            self._predictor = run_user_code(
                self.recipe.path, f"{name} could not be imported", lambda: load_predictor(self.recipe, self.stage)
            )
        log.info("imported the predictor in %.2f s", time.perf_counter() - importing)
        _limit_torch_threads(threads)
        with progress.reported(f"warming up stage {self.stage} and measuring its batch size", log):
            run_user_code(self.recipe.path, f"{name} failed on example.py at start-up", self._warm_up)

    def _warm_up(self) -> None:
        """Call the predictor on every input of the example (the first call small: a cold model is slow),
        each output encoded as a request's would be, then measure the batch size."""
        example = self._example_inputs()
        log.info("warming up on the example (%d input(s))", len(example))
        first = max(1, min(len(example), self.batch_size))
        most = self.settings.batch_size or self.settings.max_batch_size  # never more than the loop hands it
        for chunk in [example[:first]] + [example[i : i + most] for i in range(first, len(example), most)]:
            self._call(chunk, encode=True)
        if self.settings.batch_size:
            self.batch_size = self.settings.batch_size
            self.seconds_per_item = self._measure(example, self.batch_size) / self.batch_size
            log.info("batch size %d (set by --batch-size)", self.batch_size)
        else:
            log.info("searching for the batch size (up to --max-batch-size %d)", self.settings.max_batch_size)
            choice = batching.search_batch_size(lambda n: self._measure(example, n), self.settings.max_batch_size)
            self.batch_size, self.seconds_per_item = choice.batch_size, choice.seconds_per_item
            self.trials = choice.trials
            for row in batching.trial_table(choice.trials, choice.batch_size):
                log.info("%s", row)

    def _example_inputs(self) -> list[Any]:
        """This stage's inputs for the example: the files, or what the earlier stages make of them."""
        inputs: list[Any] = self.recipe.example_paths() if self.recipe.is_file else list(self.recipe.example)
        for earlier in range(self.stage):
            inputs = list(load_predictor(self.recipe, earlier)(inputs, batch_size=len(inputs)))
        return inputs

    def _measure(self, example: Sequence[Any], n: int) -> float:
        """Seconds one call on ``n`` inputs takes: the fastest of a few calls (2 to 10,
        about 0.1-0.5 s per size), since one call alone is at the mercy of the machine."""
        inputs = batching.cycle_to(example, n)
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < 10:
            t0 = time.perf_counter()
            self._call(inputs)
            times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            if len(times) >= 2 and (elapsed > 0.5 or (len(times) >= 3 and elapsed > 0.1)):
                break
        return min(times)

    def _predict(self, inputs: list[Any]) -> object:
        assert self._predictor is not None
        return self._predictor(inputs, batch_size=len(inputs))

    def _call(self, inputs: Sequence[Any], encode: bool = False) -> list[Any]:
        """One checked predictor call (warm-up and measurement: errors end the start-up). ``encode``: its
        outputs encoded as the loop encodes a request's, so outputs that no answer (JSON) or next stage
        (pickle) can carry stop the start-up instead of failing every request with 500."""
        outputs = check_outputs(self._predict(list(inputs)), len(inputs))
        if encode and self._is_last:
            run_user_code(self.recipe.path, _NOT_JSON, lambda: encode_prediction(outputs, None))
        elif encode:  # pickled and signed as at request time; a key of its own: the payload is never stored
            binding = Binding("warm-up", self.stage + 1, "", len(outputs))
            run_user_code(self.recipe.path, _NOT_PICKLED,
                          lambda: encode_stage_outputs(outputs, None, b"warm-up", binding))
        return outputs

    # -- heartbeat ------------------------------------------------------------
    def _info(self) -> WorkerInfo:
        stats = {**self.stats.as_dict(), **self.doorbell.stats, "device": self._device}
        return WorkerInfo(
            self.worker_id, self.stage, socket.gethostname(), os.getpid(), self.batch_size, self.ready, time.time(), stats
        )

    def _send_heartbeat(self) -> None:
        """Report this loop; a failure is said once (and its end), not at every beat of an outage."""
        try:
            self.store.heartbeat(self._info(), self.settings.lease_seconds)
        except FastDeployError as exc:
            if exc.reason != self._heartbeat_failure:
                log.warning("heartbeat failed (retrying at every beat): %s", exc.reason)
            self._heartbeat_failure = exc.reason
            return
        if self._heartbeat_failure:
            log.info("heartbeat recorded again")
            self._heartbeat_failure = ""

    def _heartbeat_forever(self) -> None:
        """The heartbeat thread: it must outlive any failure, or the loop's jobs are requeued under it."""
        parent = os.getppid()
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self._send_heartbeat()
            except Exception:  # a thread's top: log it, keep beating
                log.exception("heartbeat failed")
            if os.getppid() != parent:
                log.warning("the supervisor is gone; stopping")
                self.stop()

    # -- serving --------------------------------------------------------------
    def _serve(self) -> None:
        busy = False  # the last claim found work waiting
        last_batch_end = float("-inf")
        while not self._stop.is_set():
            try:
                jobs = self.store.claim(self.stage, self.batch_size, self.worker_id, self.settings.lease_seconds)
            except FastDeployError as exc:
                log.warning("cannot claim jobs (retrying): %s", exc.reason)
                self._stop.wait(1.0)
                continue
            if not jobs:
                busy = False
                self.doorbell.wait_for_jobs(self.stage, IDLE_POLL_SECONDS)
                continue
            if self.doorbell.jobs_claimed(len(jobs)):
                # clients that were just answered are likely sending again: worth a short wait
                jobs = self._top_up(jobs, busy or time.monotonic() - last_batch_end < RHYTHM_SECONDS)
            self.process(jobs, overlap=busy)
            busy = True
            last_batch_end = time.monotonic()

    def _top_up(self, jobs: list[ClaimedJob], busy: bool) -> list[ClaimedJob]:
        """Under load, wait a little (MAX_WAIT) for a fuller batch; never when idle.

        The wait ends early once requests stop arriving (no new job within
        ARRIVAL_GAP_SECONDS): with fewer clients than the batch size, the missing inputs
        cannot come until this batch is answered.
        """
        have = sum(j.n_items for j in jobs)
        wait = batching.fill_wait_seconds(
            have, self.batch_size, self.seconds_per_item, self.settings.max_wait, busy, self.trials
        )
        if wait < MIN_FILL_WAIT_SECONDS:
            return jobs  # a cheap model: another claim would cost more than the inputs it could add
        deadline = time.monotonic() + wait
        while have < self.batch_size and (remaining := deadline - time.monotonic()) > 0:
            waited_from = time.monotonic()
            self.doorbell.wait_for_more_jobs(self.stage, min(remaining, ARRIVAL_GAP_SECONDS))
            try:
                more = self.store.claim(self.stage, self.batch_size - have, self.worker_id, self.settings.lease_seconds)
            except FastDeployError:  # the store is down: predict what we hold
                break
            if not more:
                if time.monotonic() - waited_from >= ARRIVAL_GAP_SECONDS:
                    break  # nothing arrived within the gap
                continue  # an old ring woke us early: keep waiting
            jobs.extend(more)
            have += sum(j.n_items for j in more)
        return jobs

    def process(self, jobs: Sequence[ClaimedJob], overlap: bool = False) -> None:
        """Predict every input of the claimed jobs and record one outcome per job.

        ``overlap``: under load, record on the recorder thread while the next batch is
        predicted; a lone batch is recorded right here (no thread hop on its way out).
        """
        written: list[tuple[Path, list[str]]] = []
        try:
            prepared = [self._prepare(job, written) for job in jobs]
            results = predict_requests(
                self._predict, [inputs for inputs, _, _ in prepared], self.batch_size,
                on_call=self.stats.record_call, on_failure=lambda i, pos, exc: self._log_failure(jobs[i], pos, exc),
            )
            outcomes = [
                self._outcome(job, result, keys, failure)
                for job, (_, keys, failure), result in zip(jobs, prepared, results)
            ]
            del prepared, results  # the inputs and outputs: only their encoded outcomes are recorded
        finally:
            for folder, paths in written:  # before the answer goes out: files never outlive their request
                Scratch.remove(folder, paths)
        self.stats.failed_jobs += sum(1 for o in outcomes if o.reason is not None)
        if overlap:
            self._hand_over(outcomes)
        else:
            if self._recording is not None:
                self._recording.result()  # keep outcomes in order with the recorder's
            self._record(outcomes)

    def _prepare(
        self, job: ClaimedJob, written: list[tuple[Path, list[str]]]
    ) -> tuple[list[Any], Optional[list[str]], Optional[str]]:
        """A job's inputs for the predictor (its files written to scratch), its file keys, and
        why it cannot be predicted (a corrupt payload fails its own job only)."""
        if not is_job_id(job.id):  # not written by fastDeploy: it must not become a path or a log field
            log.warning("failed a claimed job whose id is not a job id, unread (something else writes into the store)")
            return [], None, "the job's id is not a valid job id; it was not predicted"
        try:
            # a later stage checks the stage secret (a one-stage service never needs, nor writes, its file);
            # stage 0 checks the job record's signature where API servers sign them (a broker with a secret)
            secret = self._stage_secret() if self.stage else store_secret.for_jobs(self.settings)
            inputs, keys = decode_payload(job.take_payload(), secret, job.binding())
            if self._file_stage and uploads.is_uploaded(inputs):  # streamed to disk by the API: no copy
                inputs = uploads.paths_for(self._files_root, job.id, inputs)
                self._uploaded.add(job.id)
            elif self._file_stage:
                folder, paths = self._scratch_folder().write(inputs)
                written.append((folder, paths))
                inputs = paths
            return inputs, keys, None
        except (UntrustedPayload, uploads.UploadMissing) as exc:  # never loaded: a payload this service did not sign fails its job only
            return [], None, f"could not prepare the inputs: {exc}"
        except Exception as exc:  # whatever a foreign payload makes the decoder raise fails this job only
            log.warning("could not prepare a job's inputs", exc_info=True, extra=logs.about_job(job.id))
            return [], None, f"could not prepare the inputs: {describe(exc)}"

    def _stage_secret(self) -> str:
        if self._secret is None:
            self._secret = store_secret.for_loop(self.settings)
        return self._secret

    def _without_paths(self, reason: str) -> str:
        """A failure reason as the client may see it: the server's scratch folder left out (a
        predictor's error often names the file it was given: the client knows it by its name)."""
        if self._scratch is not None:
            reason = re.sub(re.escape(str(self._scratch.root)) + r"/\d+/", "", reason)
        return re.sub(r"(?<![\w.:/])/(?:[\w.-]+/)+", "", reason) if "/" in reason else reason

    def _log_failure(self, job: ClaimedJob, position: int, exc: BaseException) -> None:
        """A predictor failure at request time: the job's id, and the predictor's own traceback."""
        log.warning("the predictor failed on input %d of this job: %s", position, describe(exc),
                    exc_info=user_exc_info(exc), extra=logs.about_job(job.id))

    def _scratch_folder(self) -> Scratch:
        if self._scratch is None:
            self._scratch = Scratch()
        return self._scratch

    def _hand_over(self, outcomes: Sequence[Outcome]) -> None:
        """Record outcomes on the recorder thread while the next batch is predicted.

        At most one batch waits there: if the previous one is still being recorded (the
        store is slow or down), wait for it first, so nothing piles up in memory.
        """
        if self._recording is not None:
            self._recording.result()
        self._recording = self._recorder.submit(self._record, outcomes)

    def _record(self, outcomes: Sequence[Outcome]) -> None:
        """Store the outcomes, retrying while the store is down; once stopping, one last try, then the leases decide."""
        delay = 0.5
        while True:
            try:
                free = self.store.finish(outcomes, self.worker_id)
                if self._uploaded:
                    self._delete_uploads(outcomes, set(free))
                return
            except FastDeployError as exc:
                if self._stop.is_set():
                    log.error("could not record %d outcome(s) before stopping (%s); they will be predicted again",
                              len(outcomes), exc.reason)
                    return
                log.warning("cannot record %d outcome(s) (retrying): %s", len(outcomes), exc.reason)
            self._stop.wait(delay)
            delay = min(2 * delay, 2.0)  # once the store is back (space freed), outcomes follow within 2 s

    def _delete_uploads(self, outcomes: Sequence[Outcome], free: set[str]) -> None:
        """A recorded job's uploaded files go now (kept until then: a job predicted again needs them),
        unless another loop claimed the job again after this one's lease ran out: it reads them now,
        and deletes them when it records (the sweep, should it die first)."""
        ended = [o.id for o in outcomes if o.id in self._uploaded]
        self._uploaded.difference_update(ended)
        uploads.delete(self._files_root, [job_id for job_id in ended if job_id in free])

    def _outcome(
        self, job: ClaimedJob, result: RequestResult, keys: Optional[list[str]], failure: Optional[str]
    ) -> Outcome:
        failure = failure or result.failure
        if failure is not None or result.outputs is None:
            return Outcome(job.id, self.stage, reason=self._without_paths(failure or "the prediction failed"))
        outputs = result.outputs
        try:
            if self._is_last:
                return Outcome(job.id, self.stage, result=encode_prediction(outputs, keys))
            binding = Binding(job.id, self.stage + 1, job.owner, len(outputs))
            payload = encode_stage_outputs(outputs, keys, self._stage_secret(), binding)
            return Outcome(job.id, self.stage, payload=payload, n_items=len(outputs))
        except Exception as exc:  # unencodable user output fails this job only
            what = "as JSON" if self._is_last else "for the next stage"
            log.warning("the predictor's output cannot be encoded %s: %s", what, describe(exc),
                        exc_info=True, extra=logs.about_job(job.id))
            return Outcome(job.id, self.stage, reason=f"the predictor's output cannot be encoded {what}: {describe(exc)}")
