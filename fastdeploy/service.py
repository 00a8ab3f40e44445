"""What the API server does, without HTTP: accept jobs, wait for results, report state.

Store calls block, so they run on one dedicated thread; submissions made in one turn of
the event loop are written together (group commit), on the event loop itself when the
store can write without waiting. The doorbell delivers news of finished jobs to the
event loop, where it resolves the futures of waiting /sync requests; a short poll of
the store covers lost rings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

from fastdeploy import bodies, logs, store_secret, uploads
from fastdeploy.admission import Admission
from fastdeploy.errors import FastDeployError, JobExists, OwnerLimitReached, StoreUnavailable, Unavailable
from fastdeploy.jobs import (
    STARTUP_FAILURE,
    JobState,
    JobStatus,
    JobView,
    NewJob,
    ResultNews,
    Binding,
    WorkerInfo,
    encode_inputs,
    new_job_id,
    sign_job,
)
from fastdeploy.payloads import ParsedRequest
from fastdeploy.recipe import Recipe
from fastdeploy.settings import Settings
from fastdeploy.store.base import Store
from fastdeploy.store.doorbell import Doorbell
from fastdeploy.tasks import keep_running

log = logging.getLogger(__name__)

T = TypeVar("T")

CANCELLED_REASON = "cancelled by the client (POST /cancel)"
CLIENT_GONE_REASON = "the client closed the connection before the answer; the request was not predicted"
WATCH_CLIENT_AFTER_SECONDS = 0.05  # a /sync request waiting longer starts watching its connection
RESULT_POLL_SECONDS = 0.25  # fallback check of waiting /sync jobs when no ring arrives
WRITE_AT_ONCE_BYTES = 32 * 1024  # jobs this large are not held for the event-loop turn's group commit
SNAPSHOT_SECONDS = 0.5  # how stale queue depth and worker lists may be
SWEEP_SECONDS = 5.0  # how often an API server deletes the uploaded files of jobs that ended without a loop


@dataclass(frozen=True)
class Answer:
    """An HTTP-ready answer: status code and JSON body, in one piece or in parts sent one after
    another (``bodies.Parts``: a large prediction is not copied into one more buffer)."""

    status: int
    body: bodies.Body

    @property
    def content(self) -> bytes:
        """The body in one piece (for whoever needs it whole, not for sending)."""
        return bodies.joined(self.body)


class StoreBridge:
    """Runs blocking store calls on one thread; writes submissions in groups.

    Submissions made during one turn of the event loop are written together at the end
    of that turn: right there on the event loop when the store can write without waiting
    (SQLite with no other writer active: no thread hop for a lone request), otherwise on
    the store thread, which takes everything that queued up meanwhile in one transaction.
    """

    def __init__(self, store: Store, owner_limit: int = 0) -> None:
        """``owner_limit``: the per-key bound (0: none), which the store checks in each write."""
        self.store = store
        self.owner_limit = owner_limit
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._pending: list[tuple[NewJob, asyncio.Future[None], Optional[str]]] = []  # job, waiter, request id
        self._turn_flush_scheduled = False
        self._thread_flush_scheduled = False
        self._lock = threading.Lock()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store thread, in the caller's context: its log lines name the request."""
        run = contextvars.copy_context().run
        return await asyncio.get_running_loop().run_in_executor(self._executor, run, fn, *args)

    async def submit(self, job: NewJob, alone: bool = False) -> None:
        """Write ``job``; ``alone`` (no other request in flight) writes it right now when the
        store is free, instead of at the end of this event-loop turn. So does a large job:
        grouping saves a commit, which is little beside writing its bytes, and waiting for
        the turn's other requests to be parsed first delays it by milliseconds."""
        alone = alone or len(job.payload) >= WRITE_AT_ONCE_BYTES
        if alone and not self._turn_flush_scheduled and not self._thread_flush_scheduled and not self._pending:
            if self._submit_now([job]):
                return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._pending.append((job, future, logs.REQUEST_ID.get()))
        if not self._turn_flush_scheduled:
            self._turn_flush_scheduled = True
            # in a context of its own: its log lines are about a group of jobs, not this request's
            loop.call_soon(self._flush_turn, loop, context=contextvars.Context())
        await future

    def _flush_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._turn_flush_scheduled = False
        with self._lock:
            if self._thread_flush_scheduled or not self._pending:
                return  # the store thread will take these with its next write
            batch = self._pending
            self._pending = []
        if len(batch) == 1:  # this call's context is its own: a lone job's lines name its request
            _about(batch[0][0].id, batch[0][2])
        if self._submit_now([job for job, _, _ in batch]):
            _settle([f for _, f, _ in batch], None)
            return
        with self._lock:
            self._pending[:0] = batch
            self._thread_flush_scheduled = True
        self._executor.submit(self._flush_thread, loop)

    def _submit_now(self, jobs: Sequence[NewJob]) -> bool:
        """Write on the event loop if the store needs no waiting; a failure here falls back
        to the store thread, which reports it."""
        try:
            return self.store.submit(jobs, block=False, owner_limit=self.owner_limit)
        except FastDeployError as exc:
            log.debug("immediate submit failed: %s", exc.reason)
            return False

    def _flush_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._thread_flush_scheduled = False
        if not batch:
            return
        context = contextvars.Context()  # a group's lines are about it; a lone job's about its request
        if len(batch) == 1:
            context.run(_about, batch[0][0].id, batch[0][2])
        loop.call_soon_threadsafe(_settle_each, context.run(self._write_group, [(j, f) for j, f, _ in batch]))

    def _write_group(
        self, batch: list[tuple[NewJob, asyncio.Future[None]]]
    ) -> list[tuple[asyncio.Future[None], Optional[BaseException]]]:
        """Write a group in one go; a job whose client-chosen id is in use fails alone (409), as does
        one past its owner's bound (429), and the others are written without it, so one client's
        duplicate or flood costs no one else."""
        settled: list[tuple[asyncio.Future[None], Optional[BaseException]]] = []
        seen: set[str] = set()
        rest: list[tuple[NewJob, asyncio.Future[None]]] = []
        for job, future in batch:  # the same id twice in one group: the first one wins
            if job.id in seen:
                settled.append((future, JobExists([job.id])))
            else:
                seen.add(job.id)
                rest.append((job, future))
        while rest:
            try:
                self.store.submit([job for job, _ in rest], owner_limit=self.owner_limit)
            except (JobExists, OwnerLimitReached) as exc:
                taken = set(exc.ids)
                settled += [(f, _alone(exc, j.id)) for j, f in rest if j.id in taken]
                left = [(j, f) for j, f in rest if j.id not in taken]
                if len(left) == len(rest):  # the store named none of these ids: fail them all
                    return settled + [(f, exc) for _, f in rest]
                rest = left
                continue
            except FastDeployError as exc:
                return settled + [(f, exc) for _, f in rest]
            return settled + [(f, None) for _, f in rest]
        return settled

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _about(unique_id: str, request_id: Optional[str]) -> None:
    logs.UNIQUE_ID.set(unique_id)
    logs.REQUEST_ID.set(request_id)


@dataclass(frozen=True)
class SyncOutcome:
    """How a /sync wait ended, before any wire format: 200 and the result's JSON bytes, or a failure
    status (499: the client left) and its reason."""

    status: int
    job_id: str
    result: Optional[bytes] = None
    reason: Optional[str] = None


def _alone(refusal: JobExists | OwnerLimitReached, job_id: str) -> FastDeployError:
    """The store's refusal of a group, as the refusal of one of its jobs."""
    if isinstance(refusal, OwnerLimitReached):
        return OwnerLimitReached([job_id], refusal.limit)
    return JobExists([job_id])


class ClientGone(Exception):
    """The /sync client closed its connection while waiting."""


class SyncTimeout(Exception):
    """A /sync request waited TIMEOUT seconds."""


def _fail(waiter: "asyncio.Future[JobView]", error: type[Exception]) -> None:
    if not waiter.done():
        waiter.set_exception(error())


class _Watch:
    """Fails a waiter with ClientGone when the client's connection closes."""

    def __init__(self, client_gone: Optional[Callable[[], Awaitable[None]]], waiter: "asyncio.Future[JobView]") -> None:
        self._client_gone = client_gone
        self._waiter = waiter
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        if self._client_gone is not None and not self._waiter.done():
            self._task = asyncio.ensure_future(self._run(self._client_gone))

    async def _run(self, client_gone: Callable[[], Awaitable[None]]) -> None:
        await client_gone()
        _fail(self._waiter, ClientGone)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _settle(futures: Sequence[asyncio.Future[None]], error: Optional[BaseException]) -> None:
    _settle_each([(future, error) for future in futures])


def _settle_each(outcomes: Sequence[tuple[asyncio.Future[None], Optional[BaseException]]]) -> None:
    for future, error in outcomes:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


class Service:
    """Accepts jobs, answers /sync waits, /result reads, readiness and meta."""

    def __init__(self, settings: Settings, recipe: Recipe, store: Store, doorbell: Doorbell) -> None:
        self.settings = settings
        self.recipe = recipe
        self.store = store
        self.doorbell = doorbell
        self.bridge = StoreBridge(store, settings.queue_limit_per_key)
        # store maintenance runs beside the store thread: expiring old jobs takes milliseconds a slice, which
        # would otherwise queue this process's request writes behind it (the store's lock is shared by slices)
        self._upkeep = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-upkeep")
        self._waiters: dict[str, asyncio.Future[JobView]] = {}
        self._poller: Optional[asyncio.Task[None]] = None
        self._reads: set[asyncio.Task[None]] = set()
        self._depths: list[int] = [0] * recipe.stages
        self._workers: list[WorkerInfo] = []
        self.admission = Admission(settings.queue_limit, settings.queue_limit_per_key)
        self._store_error: Optional[str] = None
        self._failing: Optional[str] = None  # why a stage's loops keep failing to start (from the store)
        self._files_root = uploads.files_root(settings)
        self._job_secret = store_secret.for_jobs(settings)
        self._sweeper: Optional[asyncio.Task[None]] = None

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        self.doorbell.listen_for_results()
        self.doorbell.watch_results(asyncio.get_running_loop(), self._deliver)
        self._poller = asyncio.create_task(keep_running("the poll for finished jobs", self._poll_waiters))
        if self._files_root is not None:
            self._sweeper = asyncio.create_task(keep_running("the sweep of uploaded files", self._sweep))
        await self.refresh()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.doorbell.stop_watching)
        for task in (self._poller, self._sweeper, *self._reads):
            if task is not None:
                task.cancel()
        uploads.let_go(self._files_root)  # no upload is in progress any more: this process's incoming folder goes
        self.bridge.close()
        self._upkeep.shutdown(wait=True)

    # -- snapshot of store state (readiness, meta, metrics, queue bound) -------
    async def refresh(self) -> None:
        """Re-read queue depths and live workers; run store maintenance."""
        self.admission.snapshot_starting()
        try:
            await asyncio.get_running_loop().run_in_executor(self._upkeep, self._maintain)
            self._depths, self._workers, unfinished, by_owner = await self.bridge.call(self._read_snapshot)
            self.admission.snapshot(unfinished, by_owner)
            self._store_error = None
            self._failing = self._startup_failure()
        except FastDeployError as exc:
            self._store_error = exc.reason

    def _maintain(self) -> None:
        self.store.maintain(time.time(), self.settings.result_ttl, self.worker_timeout,
                            self.settings.waited_result_ttl)

    def _read_snapshot(self) -> tuple[list[int], list[WorkerInfo], int, dict[str, int]]:
        by_owner = self.store.unfinished_by_owner() if self.settings.queue_limit_per_key else {}
        return self.store.queue_depths(self.recipe.stages), self.store.workers(), self.store.unfinished(), by_owner

    async def _sweep(self) -> float:
        """Delete uploaded files of jobs that ended without a loop (off the snapshot: a slow folder delays nothing)."""
        try:
            await uploads.sweep(self._files_root, self._ended, time.time())
        except FastDeployError as exc:  # store down: the next sweep tries again
            log.debug("the sweep of uploaded files could not ask the store: %s", exc.reason)
        return SWEEP_SECONDS

    async def _ended(self, ids: list[str]) -> set[str]:
        """Of these jobs, those that have ended or are unknown: their uploaded files may go."""
        return uploads.finished_ids(await self.bridge.call(self.store.states, ids), ids)

    @property
    def worker_timeout(self) -> float:
        return max(5.0, 5 * self.settings.heartbeat_seconds)

    def live_workers(self) -> list[WorkerInfo]:
        cutoff = time.time() - self.worker_timeout
        return [w for w in self._workers if w.seen >= cutoff]

    def snapshot(self) -> tuple[list[int], list[WorkerInfo]]:
        return list(self._depths), self.live_workers()

    def not_ready_reason(self) -> Optional[str]:
        if self._store_error:
            return self._store_error
        ready_stages = {w.stage for w in self.live_workers() if w.ready}
        waiting = [str(s) for s in range(self.recipe.stages) if s not in ready_stages]
        if waiting:
            return self._failing or (
                f"not ready: no prediction loop is serving stage(s) {', '.join(waiting)} yet (loading or warming up)"
            )
        return None

    def _startup_failure(self) -> Optional[str]:
        """Why a stage with no ready loop cannot get one: a supervisor's record that its loops keep failing
        to start (see ``STARTUP_FAILURE``); None while every stage is served or may still be loading."""
        live = self.live_workers()
        ready = {w.stage for w in live if w.ready}
        reasons = [str(w.stats[STARTUP_FAILURE]) for w in live
                   if not w.ready and w.stage not in ready and w.stats.get(STARTUP_FAILURE)]
        return min(reasons) if reasons else None

    # -- requests -------------------------------------------------------------
    def _check_store(self) -> None:
        """503 at once when the store is down or a stage cannot get a loop, rather than a wait for TIMEOUT."""
        if self._store_error:
            raise StoreUnavailable(self._store_error, retry_after=2.0)
        if self._failing:
            raise Unavailable(self._failing, retry_after=5.0)

    def check_accepting(self, owner: str = "") -> None:
        """Refuse now what a submit would refuse (store down, loops failing to start: 503; queue full:
        503; the owner's bound: 429), before a long upload is read only to be refused. Counts nothing:
        the submit admits the job as always."""
        self._check_store()
        self.admission.check(owner)

    async def _submit(self, job: NewJob, alone: bool = False) -> None:
        """Admit the job (the queue bounds), then write it; a job whose write fails is let go."""
        self.admission.admit(job.owner)
        written = False
        try:
            await self.bridge.submit(job, alone)
            written = True
        finally:
            self.admission.written(job.owner, written)

    def _new_job(self, request: ParsedRequest, deadline: Optional[float], owner: str, waited: bool = False) -> NewJob:
        """A /sync job (``waited``) is waited for here: the store sends its outcome back to this process.
        Past its ``deadline`` a job is not predicted (its own timeout; for /sync at most TIMEOUT)."""
        payload = encode_inputs(request.inputs, request.keys)
        origin = (self.doorbell.address or "") if waited else None  # set for every waited-for job: it expires sooner
        job_id = request.unique_id or new_job_id()
        logs.UNIQUE_ID.set(job_id)  # the request's later log lines are about this job
        if self._job_secret:  # the whole record a worker acts on, bound to this id, stage and owner
            payload = sign_job(payload, Binding(job_id, 0, owner, len(request.inputs)), self._job_secret)
        return NewJob(job_id, payload, len(request.inputs), request.priority, deadline, request.webhook, origin, owner)

    async def submit_async(self, request: ParsedRequest, owner: str = "") -> str:
        self._check_store()
        deadline = None if request.timeout is None else time.time() + request.timeout
        job = self._new_job(request, deadline, owner)
        del request  # the inputs live on in the job's payload only: a large input is held once, not twice
        await self._submit(job)
        return job.id

    async def predict_sync(
        self, request: ParsedRequest, owner: str = "", client_gone: Optional[Callable[[], Awaitable[None]]] = None,
        timeout: Optional[float] = None,
    ) -> Answer:
        """``wait_sync``'s outcome as the seed API's /sync answers it."""
        outcome = await self.wait_sync(request, owner, client_gone, timeout)
        del request
        if outcome.status == 200:
            return Answer(200, bodies.prediction(outcome.job_id, outcome.result))
        if outcome.status == 499:
            return Answer(499, b"")  # nobody reads it
        return Answer(outcome.status, bodies.failure(outcome.reason or "the prediction failed", outcome.job_id))

    async def wait_sync(
        self, request: ParsedRequest, owner: str = "", client_gone: Optional[Callable[[], Awaitable[None]]] = None,
        timeout: Optional[float] = None,
    ) -> SyncOutcome:
        """Queue the job and wait for its outcome, until TIMEOUT (or the request's own shorter
        timeout: ``timeout``, else the body's) or until the client leaves. Each wire format
        (/sync, /infer) builds its answer from the outcome once.

        ``client_gone()`` completes when the client closes its connection; its job is then
        taken off the queue (if no loop has started on it), so nobody predicts for no one.
        Watching starts only once a request has waited a little: quick answers skip it.
        """
        self._check_store()
        timeout = request.timeout if timeout is None else timeout
        limit = f"TIMEOUT={self.settings.timeout:g} s"
        if timeout is not None and timeout < self.settings.timeout:
            limit = f"the request's timeout of {timeout:g} s"
        else:
            timeout = self.settings.timeout
        job = self._new_job(request, time.time() + timeout, owner, waited=True)
        del request  # the inputs live on in the job's payload only, and that only until it is written
        job_id = job.id
        if job_id in self._waiters:  # its client's id is being waited for here: the store would refuse it too
            raise JobExists([job_id])
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[JobView] = loop.create_future()
        self._waiters[job_id] = waiter
        timer = loop.call_later(timeout, _fail, waiter, SyncTimeout)
        watch = _Watch(client_gone, waiter)
        start_watch = loop.call_later(WATCH_CLIENT_AFTER_SECONDS, watch.start) if client_gone is not None else None
        try:
            await self._submit(job, alone=len(self._waiters) == 1)
            del job
            view = await self.doorbell.wait_for_answer(waiter, self._alone)
        except SyncTimeout:
            reason = f"no prediction within {limit}; the request was dropped; use /async for long jobs"
            return SyncOutcome(504, job_id, reason=reason)
        except ClientGone:
            await self._abandon(job_id)
            return SyncOutcome(499, job_id)  # nobody reads it
        finally:
            self._waiters.pop(job_id, None)
            timer.cancel()
            if start_watch is not None:
                start_watch.cancel()
            watch.stop()
        if view.status is JobStatus.DONE:
            return SyncOutcome(200, job_id, result=view.result)
        # the status comes from the store: an error status, whatever a foreign writer put there
        status = view.error_status if 400 <= view.error_status <= 599 else 500
        return SyncOutcome(status, job_id, reason=view.reason or "the prediction failed")

    def _alone(self) -> bool:
        """Whether one /sync request alone waits in this process."""
        return len(self._waiters) == 1

    async def _abandon(self, job_id: str) -> None:
        try:
            await self.bridge.call(self.store.cancel, [job_id], CLIENT_GONE_REASON, 499)
        except FastDeployError as exc:  # the job then runs to the end; only work is wasted
            log.warning("could not take abandoned job %s off the queue: %s", job_id, exc.reason)

    async def _state(self, unique_id: str, reader: Optional[str]) -> Optional[JobState]:
        """The job's status, if it exists and ``reader`` may see it (None: anyone may): another
        owner's job is as unknown as one that never existed. Its result is never read here."""
        state = (await self.bridge.call(self.store.states, [unique_id])).get(unique_id)
        if state is None or (reader is not None and state.owner != reader):
            return None
        return state

    def _not_found(self, unique_id: str) -> Answer:
        """404 for an id this reader cannot see (unknown, another key's, or expired), saying how long results stay."""
        return Answer(404, bodies.not_found(unique_id, self.settings.result_ttl, self.settings.waited_result_ttl))

    async def result(self, unique_id: str, reader: Optional[str] = None) -> Answer:
        # with keys, the store reads only the reader's own job: another key's result (perhaps large) never
        view = (await self.bridge.call(self.store.get, [unique_id], reader)).get(unique_id)
        if view is None:
            return self._not_found(unique_id)
        return Answer(200, bodies.result_parts(view.id, view.status, view.result, view.reason, view.webhook))

    async def cancel(self, unique_id: str, reader: Optional[str] = None) -> Answer:
        """Cancel a job that is queued (it is not predicted) or being predicted (its outcome is
        discarded); a finished job is a conflict."""
        state = await self._state(unique_id, reader)
        if state is None:
            return self._not_found(unique_id)
        if not state.status.finished:
            ended = await self.bridge.call(
                functools.partial(self.store.cancel, [unique_id], CANCELLED_REASON, 409, status=JobStatus.CANCELLED,
                                  running=True)
            )
            if ended:
                return Answer(200, bodies.cancelled(unique_id, JobStatus.CANCELLED.value))
            state = await self._state(unique_id, reader) or state  # it finished meanwhile
        if not state.status.finished:
            return self._not_found(unique_id)  # gone (expired) between the two reads
        reason = f"job {unique_id!r} has already ended ({state.status.value}); there is nothing to cancel"
        return Answer(409, bodies.failure(reason, unique_id))

    # -- results -------------------------------------------------------------
    def _deliver(self, news: list[ResultNews]) -> None:
        """News from the doorbell, on the event loop: outcomes carried whole resolve their
        waiters at once; bare ids of jobs waited for here are read from the store."""
        carried: list[JobView] = []
        wanted: list[str] = []
        for item in news:
            if isinstance(item, JobView):
                carried.append(item)
            elif item in self._waiters:
                wanted.append(item)
        self._resolve(carried)
        if wanted:
            task = asyncio.create_task(self._read_and_resolve(wanted))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)

    async def _read_and_resolve(self, ids: list[str]) -> None:
        try:
            views = await self.bridge.call(self.store.get, ids)
        except FastDeployError as exc:  # store down: the poll tries again; /sync waits until TIMEOUT, then 504
            log.warning("reading finished jobs failed: %s", exc.reason)
            return
        self._resolve([v for v in views.values() if v.status.finished])

    async def _poll_waiters(self) -> float:
        """The fallback for lost rings: look at every waiting job now and then."""
        if self._waiters:
            await self._read_and_resolve(list(self._waiters))
        return RESULT_POLL_SECONDS

    def _resolve(self, views: list[JobView]) -> None:
        for view in views:
            waiter = self._waiters.get(view.id)
            if waiter is not None and not waiter.done():
                waiter.set_result(view)

    # -- meta -----------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        workers = self.live_workers()
        stages = []
        for stage, file in enumerate(self.recipe.stage_files):
            mine = [w for w in workers if w.stage == stage]
            stages.append({
                "stage": stage,
                "file": file.name,
                "batch_size": max((w.batch_size for w in mine if w.ready), default=None),
                "queue_depth": self._depths[stage] if stage < len(self._depths) else 0,
                "workers": [
                    {"worker_id": w.worker_id, "host": w.host, "pid": w.pid, "batch_size": w.batch_size,
                     "ready": w.ready, "items": w.stats.get("items", 0), "device": w.stats.get("device")}
                    for w in mine
                ],
            })
        example = [str(p) for p in self.recipe.example] if self.recipe.is_file else self.recipe.example
        s = self.settings
        return {
            "name": self.recipe.name,
            "input_type": self.recipe.input_type,
            "example": example,
            "stages": stages,
            "ready": self.not_ready_reason() is None,
            "limits": {
                "timeout": s.timeout,
                "max_per_client_batch": s.max_per_client_batch,
                "max_body_mb": s.max_body_mb,
                "queue_limit": s.queue_limit,
                "only_async": s.only_async,
                "result_ttl": s.result_ttl,
                "sync_result_ttl": s.waited_result_ttl,
            },
        }
