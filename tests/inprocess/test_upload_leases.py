"""Uploaded files belong to the loop that holds their job: real loops on the embedded store in the
test process (``inproc``), a lease made to run out mid-prediction (issue #25, point 1). The store
side, on both backends, is ``tests/store/test_contract.py::test_only_a_loop_no_other_holds_*``."""

from __future__ import annotations

import time

import orjson
import pytest

from fastdeploy import uploads
from fastdeploy.jobs import JobStatus, NewJob, encode_inputs, new_job_id
from tests.helpers import make_file_recipe

pytestmark = pytest.mark.timeout(60)


def test_a_loop_whose_lease_ran_out_leaves_the_files_of_a_job_claimed_again(inproc, tmp_path):
    """Issue #25 point 1: w1's lease runs out mid-prediction, w2 claims the job again and reads its
    uploaded file; w1 records first and must leave the file to w2, which deletes it once it records."""
    folder_recipe = make_file_recipe(tmp_path / "files-recipe")
    settings = inproc.settings(folder_recipe, batch_size=4)
    recipe = inproc.recipe(folder_recipe)
    first = inproc.make_loop(settings, recipe, stage=0, worker_id="w1")
    second = inproc.make_loop(settings, recipe, stage=0, worker_id="w2")
    first._load()
    second._load()
    store = first.store
    job_id = new_job_id()
    root = uploads.files_root(settings)
    assert root is not None
    (root / job_id).mkdir(parents=True)
    (root / job_id / "a.txt").write_bytes(b"abc")
    store.submit([NewJob(job_id, encode_inputs([["a.txt", {"upload": job_id}]], ["a.txt"]), 1, 5)])
    held_by_first = store.claim(0, 8, "w1", 30)
    store.maintain(time.time() + 60, 1e9, 1e9)  # w1's lease ran out while it predicted
    held_by_second = store.claim(0, 8, "w2", 30)
    assert [j.id for j in held_by_second] == [job_id]
    first.process(held_by_first)  # w1 records first
    assert (root / job_id / "a.txt").read_bytes() == b"abc"  # w2 is reading it
    second.process(held_by_second)
    assert not (root / job_id).exists()
    view = store.get([job_id])[job_id]
    assert view.status is JobStatus.DONE and orjson.loads(view.result)["a.txt"]["size"] == 3
    assert second.stats.failed_jobs == 0  # w2 found its file
