"""Service and PredictionLoop together in the test process: real SQLite store and doorbell
sockets in a temp folder, the loop on a thread, the service on an asyncio event loop.
No subprocesses, no HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import msgpack
import orjson
import pytest

from fastdeploy.jobs import JobStatus, NewJob, encode_inputs, new_job_id
from fastdeploy.payloads import DEFAULT_ASYNC_PRIORITY, DEFAULT_SYNC_PRIORITY, ParsedRequest
from tests.helpers import RECIPES, TEST_RECIPES
from tests.inprocess.conftest import async_wait_until, wait_until

ECHO = RECIPES / "echo"
FAULTY = TEST_RECIPES / "faulty"
CHAIN = TEST_RECIPES / "chain"

pytestmark = pytest.mark.timeout(60)


def sync_request(*inputs) -> ParsedRequest:
    return ParsedRequest(list(inputs), None, DEFAULT_SYNC_PRIORITY, None)


def async_request(*inputs) -> ParsedRequest:
    return ParsedRequest(list(inputs), None, DEFAULT_ASYNC_PRIORITY, None)


def run(coro, timeout: float = 15.0):
    """Run a test scenario on a fresh event loop, bounded so a lost answer fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def finished_result(service, job_id: str) -> dict:
    async def done():
        answer = await service.result(job_id)
        assert answer.status == 200, answer
        body = orjson.loads(answer.content)
        return body if body["status"] in ("done", "failed") else None

    return await async_wait_until(done, what=f"job {job_id} finished")


# -- (a) /sync ------------------------------------------------------------------------


def test_predict_sync_answers_the_prediction_and_the_job_shows_done(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)
    loop = inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            answer = await service.predict_sync(sync_request("hello", {"a": 1}, [1, 2, 3], 4.5))
            assert answer.status == 200, answer
            body = orjson.loads(answer.content)
            assert body["success"] is True
            assert body["prediction"] == ["hello", {"a": 1}, [1, 2, 3], 4.5]
            job_id = body["unique_id"]
            assert isinstance(job_id, str) and len(job_id) == 32

            stored = await service.result(job_id)
            assert stored.status == 200
            assert orjson.loads(stored.content) == {
                "unique_id": job_id, "status": "done", "success": True,
                "prediction": ["hello", {"a": 1}, [1, 2, 3], 4.5],
            }
            return job_id

    job_id = run(scenario())
    assert loop.stats.items == 4 and loop.stats.batches == 1 and loop.stats.failed_jobs == 0
    view = loop.store.get([job_id])[job_id]
    assert view.status is JobStatus.DONE and orjson.loads(view.result) == ["hello", {"a": 1}, [1, 2, 3], 4.5]


def test_an_unknown_id_is_404(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            answer = await service.result("no-such-job")
            assert answer.status == 404
            body = orjson.loads(answer.content)
            assert body["status"] == "not_found" and body["success"] is False and "no-such-job" in body["reason"]

    run(scenario())


# -- (b) /async -----------------------------------------------------------------------


def test_submit_async_then_poll_the_result_until_done(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)
    inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            job_id = await service.submit_async(async_request({"x": 1}, "two"))
            first = orjson.loads((await service.result(job_id)).content)
            assert first["unique_id"] == job_id
            assert first["status"] in ("queued", "processing", "done")
            body = await finished_result(service, job_id)
            assert body == {"unique_id": job_id, "status": "done", "success": True, "prediction": [{"x": 1}, "two"]}

    run(scenario())


def test_async_jobs_wait_in_the_queue_until_a_loop_starts(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            ids = [await service.submit_async(async_request(i)) for i in range(3)]
            await service.refresh()
            assert service.snapshot()[0] == [3]  # queue depth of stage 0
            for job_id in ids:
                assert orjson.loads((await service.result(job_id)).content)["status"] == "queued"
            inproc.start_loop(settings, recipe)
            bodies = [await finished_result(service, job_id) for job_id in ids]
            assert [b["prediction"] for b in bodies] == [[0], [1], [2]]
            await service.refresh()
            assert service.snapshot()[0] == [0]

    run(scenario())


# -- (c) batching across requests ------------------------------------------------------


def test_many_concurrent_sync_requests_are_all_answered_in_shared_batches(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)
    loop = inproc.start_loop(settings, recipe)
    n = 20

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            return await asyncio.gather(*(service.predict_sync(sync_request(i, f"s{i}")) for i in range(n)))

    answers = run(scenario())
    ids = set()
    for i, answer in enumerate(answers):
        assert answer.status == 200, answer
        body = orjson.loads(answer.content)
        assert body["prediction"] == [i, f"s{i}"]  # each request gets its own outputs back, in order
        ids.add(body["unique_id"])
    assert len(ids) == n
    stats = loop.stats
    assert stats.batch_sum == stats.items == 2 * n
    assert stats.batches < n, f"{stats.batches} predictor calls for {n} requests: no batching across requests"
    # the histogram is cumulative (calls of at most 1, 2, 4 ... inputs): some call held more than one request's 2
    assert stats.batch_buckets[1] < stats.batches
    assert stats.failed_jobs == 0


# -- (d) a failing input fails its own request only -------------------------------------


def test_only_the_request_with_the_failing_input_fails(inproc):
    settings = inproc.settings(FAULTY)
    recipe = inproc.recipe(FAULTY)
    loop = inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            return await asyncio.gather(
                service.predict_sync(sync_request("a", 1)),
                service.predict_sync(sync_request("b", "boom", "c")),
                service.predict_sync(sync_request(2.5)),
                service.predict_sync(sync_request("object")),
                service.predict_sync(sync_request("numpy", "d")),
            )

    good1, bad, good2, unencodable, numpy_ok = run(scenario())
    assert good1.status == 200 and orjson.loads(good1.content)["prediction"] == ["a", 1]
    assert good2.status == 200 and orjson.loads(good2.content)["prediction"] == [2.5]
    assert numpy_ok.status == 200
    assert orjson.loads(numpy_ok.content)["prediction"] == [{"scalar": 1.5, "array": [0, 1, 2], "int": 7}, "d"]

    assert bad.status == 500
    body = orjson.loads(bad.content)
    assert body["success"] is False
    assert body["reason"] == "the predictor failed on input 1 of this request: ValueError: cannot predict 'boom'"

    assert unencodable.status == 500
    reason = orjson.loads(unencodable.content)["reason"]
    assert reason.startswith("the predictor's output cannot be encoded as JSON"), reason

    assert loop.stats.failed_jobs == 2
    view = loop.store.get([body["unique_id"]])[body["unique_id"]]
    assert view.status is JobStatus.FAILED and "cannot predict 'boom'" in view.reason


def test_a_predictor_returning_too_few_outputs_fails_only_that_request(inproc):
    settings = inproc.settings(FAULTY)
    recipe = inproc.recipe(FAULTY)
    inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            return await asyncio.gather(
                service.predict_sync(sync_request("a")),
                service.predict_sync(sync_request("short")),
                service.predict_sync(sync_request("b")),
            )

    first, short, last = run(scenario())
    assert first.status == 200 and orjson.loads(first.content)["prediction"] == ["a"]
    assert last.status == 200 and orjson.loads(last.content)["prediction"] == ["b"]
    assert short.status == 500
    assert orjson.loads(short.content)["reason"] == (
        "the predictor failed on input 0 of this request: PredictorOutputError: "
        "the predictor returned 0 outputs for 1 input; it must return one per input"
    )


# -- (e) readiness ---------------------------------------------------------------------


def test_not_ready_until_a_loop_has_warmed_up(inproc):
    gate = inproc.gate(example=["hold"])  # the warm-up call waits for the gate
    settings = inproc.settings(gate.folder)
    recipe = inproc.recipe(gate.folder)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            reason = service.not_ready_reason()
            assert reason is not None and "stage(s) 0" in reason  # no loop at all

            loop = inproc.start_loop(settings, recipe, wait_ready=False)
            await asyncio.to_thread(wait_until, gate.started.exists, what="the warm-up call")

            async def listed():  # the heartbeat lists the loop while it loads, as not ready
                await service.refresh()
                return [w for w in service.live_workers() if w.worker_id == loop.worker_id]

            (worker,) = await async_wait_until(listed, what="the loading loop listed")
            assert worker.ready is False
            assert not loop.ready
            assert service.not_ready_reason() is not None and "stage(s) 0" in service.not_ready_reason()
            assert orjson.loads(orjson.dumps(service.meta()))["ready"] is False

            gate.open()

            async def ready():
                await service.refresh()
                return service.not_ready_reason() is None

            await async_wait_until(ready, what="ready")
            assert loop.ready
            meta = service.meta()
            assert meta["ready"] is True and meta["stages"][0]["batch_size"] == 4

            answer = await service.predict_sync(sync_request("y"))
            assert answer.status == 200 and orjson.loads(answer.content)["prediction"] == [{"got": "y"}]

    run(scenario())


def test_a_stopped_loop_releases_its_worker_and_the_service_is_not_ready_again(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)
    loop = inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            async def ready():
                await service.refresh()
                return service.not_ready_reason() is None

            await async_wait_until(ready, what="ready")
            await asyncio.to_thread(inproc.stop_loop, loop)
            await service.refresh()
            assert [w.worker_id for w in service.live_workers()] == []
            assert "stage(s) 0" in service.not_ready_reason()

    run(scenario())


# -- (f) process() directly --------------------------------------------------------------


def test_process_records_outcomes_and_a_corrupt_payload_fails_alone(inproc):
    settings = inproc.settings(ECHO)
    recipe = inproc.recipe(ECHO)
    loop = inproc.make_loop(settings, recipe, worker_id="direct")
    loop._load()  # the start-up step of run(): import the predictor, warm it up
    store = loop.store

    good = [NewJob(new_job_id(), encode_inputs(["a", {"b": 2}]), 2, 5),
            NewJob(new_job_id(), encode_inputs([3]), 1, 5)]
    corrupt = [
        NewJob(new_job_id(), b"\xc1 not msgpack", 1, 5),  # 0xc1 is never valid msgpack
        NewJob(new_job_id(), msgpack.packb([1, 2]), 2, 5),  # valid msgpack, not an inputs document
        NewJob(new_job_id(), b"P\x80\x05not a pickle", 1, 5),  # claims to be a stage payload
    ]
    late = NewJob(new_job_id(), encode_inputs(["last"]), 1, 5)
    jobs = [good[0], corrupt[0], good[1], corrupt[1], corrupt[2], late]
    assert store.submit(jobs) is True

    claimed = store.claim(0, 100, loop.worker_id, 30)
    assert [c.id for c in claimed] == [j.id for j in jobs]
    assert {v.status for v in store.get([j.id for j in jobs]).values()} == {JobStatus.PROCESSING}

    loop.process(claimed)

    views = store.get([j.id for j in jobs])
    for job, expected in ((good[0], ["a", {"b": 2}]), (good[1], [3]), (late, ["last"])):
        assert views[job.id].status is JobStatus.DONE
        assert orjson.loads(views[job.id].result) == expected
    for job in corrupt:
        view = views[job.id]
        assert view.status is JobStatus.FAILED
        assert view.reason.startswith("could not prepare the inputs"), view.reason
        assert view.result is None
    assert loop.stats.failed_jobs == 3
    assert loop.stats.batch_sum == 4  # only the good inputs reached the predictor
    assert store.unfinished() == 0
    assert store.claim(0, 100, loop.worker_id, 30) == []  # nothing was put back


def test_process_moves_chain_jobs_to_the_next_stage_and_finishes_them_there(inproc):
    settings = inproc.settings(CHAIN, batch_size=8)
    recipe = inproc.recipe(CHAIN)
    first = inproc.make_loop(settings, recipe, stage=0, worker_id="s0")
    second = inproc.make_loop(settings, recipe, stage=1, worker_id="s1")
    first._load()
    second._load()
    store = first.store

    jobs = [NewJob(new_job_id(), encode_inputs([1, 2]), 2, 5), NewJob(new_job_id(), encode_inputs([5]), 1, 5)]
    store.submit(jobs)
    first.process(store.claim(0, 8, "s0", 30))
    views = store.get([j.id for j in jobs])
    assert {v.status for v in views.values()} == {JobStatus.QUEUED}  # waiting for stage 1 now
    assert store.queue_depths(2) == [0, 2]

    claimed = store.claim(1, 8, "s1", 30)
    assert sorted(c.id for c in claimed) == sorted(j.id for j in jobs) and all(c.stage == 1 for c in claimed)
    # a stage-1 job whose pickle is corrupt fails alone too
    broken = NewJob(new_job_id(), encode_inputs([9]), 1, 5)
    store.submit([broken])
    first.process(store.claim(0, 8, "s0", 30))
    (broken_claimed,) = store.claim(1, 8, "s1", 30)
    broken_claimed = dataclasses.replace(broken_claimed, payload=b"P\x00garbage")  # its pickle got mangled
    second.process([*claimed, broken_claimed])

    views = store.get([j.id for j in jobs] + [broken.id])
    assert orjson.loads(views[jobs[0].id].result) == [
        {"input": 1, "double": 2, "stage2_batch": 3}, {"input": 2, "double": 4, "stage2_batch": 3}]
    assert orjson.loads(views[jobs[1].id].result) == [{"input": 5, "double": 10, "stage2_batch": 3}]
    assert views[broken.id].status is JobStatus.FAILED
    assert views[broken.id].reason.startswith("could not prepare the inputs")
    assert store.unfinished() == 0


# -- (g) processing while the predictor runs -------------------------------------------


def test_a_job_shows_processing_while_its_predictor_runs(inproc):
    gate = inproc.gate()
    settings = inproc.settings(gate.folder)
    recipe = inproc.recipe(gate.folder)
    loop = inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            job_id = await service.submit_async(async_request("hold"))
            await asyncio.to_thread(wait_until, gate.started.exists, what="the predictor started")
            view = loop.store.get([job_id])[job_id]
            assert view.status is JobStatus.PROCESSING and view.result is None
            body = orjson.loads((await service.result(job_id)).content)
            assert body == {"unique_id": job_id, "status": "processing", "success": None}
            await service.refresh()
            assert service.snapshot()[0] == [0]  # claimed: no longer waiting in the queue
            assert loop.store.unfinished() == 1

            gate.open()
            body = await finished_result(service, job_id)
            assert body["status"] == "done" and body["prediction"] == [{"got": "hold"}]

    run(scenario())


def test_a_sync_request_waits_while_processing_and_is_answered_when_the_predictor_returns(inproc):
    gate = inproc.gate()
    settings = inproc.settings(gate.folder)
    recipe = inproc.recipe(gate.folder)
    inproc.start_loop(settings, recipe)

    async def scenario():
        async with inproc.service(settings, recipe) as service:
            pending = asyncio.ensure_future(service.predict_sync(sync_request("hold", "z")))
            await asyncio.to_thread(wait_until, gate.started.exists, what="the predictor started")
            await asyncio.sleep(0.05)
            assert not pending.done()
            started = time.monotonic()
            gate.open()
            answer = await pending
            assert time.monotonic() - started < 3
            assert answer.status == 200
            assert orjson.loads(answer.content)["prediction"] == [{"got": "hold"}, {"got": "z"}]

    run(scenario())
