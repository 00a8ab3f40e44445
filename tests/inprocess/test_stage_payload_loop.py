"""A prediction loop never unpickles a stage payload this service did not sign.

Real loops on the embedded store in the test process (``inproc``): a forged or unsigned
payload fails its own job with a reason and runs nothing; the other jobs of the batch
still succeed; loops of one service on the embedded store share the state folder's secret.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import stat
from pathlib import Path

import orjson
import pytest

from fastdeploy.jobs import NOT_SIGNED_REASON, Binding, JobStatus, NewJob, encode_inputs, encode_stage_outputs, new_job_id
from tests.helpers import TEST_RECIPES

CHAIN = TEST_RECIPES / "chain"
SECRET = "0123456789abcdef" * 4
OTHER = "fedcba9876543210" * 4

pytestmark = pytest.mark.timeout(60)


class Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def _two_loops(inproc, **flags):
    settings = inproc.settings(CHAIN, batch_size=8, **flags)
    recipe = inproc.recipe(CHAIN)
    first = inproc.make_loop(settings, recipe, stage=0, worker_id="s0")
    second = inproc.make_loop(settings, recipe, stage=1, worker_id="s1")
    first._load()
    second._load()
    return first, second


def test_forged_stage_payloads_fail_their_job_and_run_nothing(inproc, tmp_path):
    first, second = _two_loops(inproc)
    store = first.store
    pwned = tmp_path / "pwned"
    good, old, forged = (NewJob(new_job_id(), encode_inputs([n]), 1, 5) for n in (1, 2, 3))
    store.submit([good, old, forged])
    first.process(store.claim(0, 8, "s0", 30))
    claimed = {c.id: c for c in store.claim(1, 8, "s1", 30)}
    assert set(claimed) == {good.id, old.id, forged.id}
    # what someone with write access to the store could put there instead of stage 0's output
    claimed[old.id] = dataclasses.replace(
        claimed[old.id], payload=b"P" + pickle.dumps({"i": [Touch(pwned)], "k": None}))
    claimed[forged.id] = dataclasses.replace(
        claimed[forged.id], payload=encode_stage_outputs([Touch(pwned)], None, OTHER, claimed[forged.id].binding()))
    second.process(list(claimed.values()))

    views = store.get([good.id, old.id, forged.id])
    assert orjson.loads(views[good.id].result) == [{"input": 1, "double": 2, "stage2_batch": 1}]
    for job in (old, forged):
        assert views[job.id].status is JobStatus.FAILED
        assert views[job.id].reason == f"could not prepare the inputs: {NOT_SIGNED_REASON}"
    assert not pwned.exists()
    # the embedded store's loops signed and checked with the state folder's generated secret
    secret_file = inproc.state / "store_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_a_pickle_submitted_at_stage_0_is_refused(inproc, tmp_path):
    first, _ = _two_loops(inproc, store_secret=SECRET)
    store = first.store
    pwned = tmp_path / "pwned"
    signed = encode_stage_outputs([Touch(pwned)], None, SECRET, Binding("j", 0, "", 1))  # even one signed with the service's key
    unsigned = b"P" + pickle.dumps({"i": [Touch(pwned)], "k": None})
    jobs = [NewJob(new_job_id(), payload, 1, 5) for payload in (signed, unsigned)]
    store.submit(jobs)
    first.process(store.claim(0, 8, "s0", 30))
    views = store.get([j.id for j in jobs])
    for job in jobs:
        assert views[job.id].status is JobStatus.FAILED
        assert views[job.id].reason.startswith("could not prepare the inputs: stage 0 takes only"), views[job.id].reason
    assert not pwned.exists()


def test_stages_with_different_secrets_fail_the_job_with_the_hint(inproc):
    settings = inproc.settings(CHAIN, batch_size=8, store_secret=SECRET)
    recipe = inproc.recipe(CHAIN)
    first = inproc.make_loop(settings, recipe, stage=0, worker_id="s0")
    second = inproc.make_loop(dataclasses.replace(settings, store_secret=OTHER), recipe, stage=1, worker_id="s1")
    first._load()
    second._load()
    job = NewJob(new_job_id(), encode_inputs([4]), 1, 5)
    first.store.submit([job])
    first.process(first.store.claim(0, 8, "s0", 30))
    second.process(second.store.claim(1, 8, "s1", 30))
    view = first.store.get([job.id])[job.id]
    assert view.status is JobStatus.FAILED
    assert "check --store-secret on every host" in view.reason
    assert not (inproc.state / "store_secret").exists()  # a given secret: nothing generated

