"""Loops per device through the real CLI: each replica gets its own CUDA_VISIBLE_DEVICES and
FASTDEPLOY_DEVICE, reports its device in /meta and /metrics; no GPU is needed for any of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.helpers import ROOT, TEST_RECIPES, Server, serve, wait_until

RECIPE = TEST_RECIPES / "device_env"
ENV = {"BATCH_SIZE": "1", "FD_TEST_SLEEP": "0.1"}


@pytest.fixture(autouse=True)
def no_inherited_gpu_choice(monkeypatch):
    """`auto` honours a CUDA_VISIBLE_DEVICES the service starts with; these tests choose their own."""
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)


def fake_nvidia_smi(folder: Path, gpus: int) -> str:
    """A PATH on which `nvidia-smi -L` lists ``gpus`` GPUs."""
    folder.mkdir()
    lines = "".join(f"echo 'GPU {i}: Fake GPU (UUID: GPU-0000000{i}-aaaa)'\n" for i in range(gpus))
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{lines}")
    (folder / "nvidia-smi").chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def loops_by_pid(server: Server, count: int) -> dict[int, dict]:
    """What each loop's predictor saw, keyed by its pid: concurrent requests until ``count`` loops answered."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(4 * count) as pool:
        while len(seen) < count and time.monotonic() < deadline:
            for answer in pool.map(lambda i: server.post("/sync", {"data": [i]}).json(), range(4 * count)):
                seen[answer["prediction"][0]["pid"]] = answer["prediction"][0]
    assert len(seen) == count, seen
    return seen


def meta_workers(server: Server, count: int) -> list[dict]:
    def ready() -> list[dict]:
        workers = server.get("/meta").json()["stages"][0]["workers"]
        return workers if len(workers) == count and all(w["ready"] for w in workers) else []
    return wait_until(ready, 60, f"{count} ready loops in /meta")


def worker_info(server: Server) -> dict[str, str]:
    """worker id -> device, from the fastdeploy_worker_info lines of /metrics."""
    text = server.get("/metrics").text
    found = re.findall(r'^fastdeploy_worker_info\{([^}]*)\} 1\.0$', text, flags=re.M)
    labels = [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in found]
    return {label["worker"]: label["device"] for label in labels}


def test_two_replicas_on_each_of_two_gpus_each_see_their_own():
    with serve(RECIPE, args=["--devices", "0,1", "--replicas-per-device", "2", "--replicas", "3"], env=ENV) as server:
        assert len(server.children()) == 5  # one API server; 2 GPUs x 2 replicas (--replicas is for the CPU)
        workers = meta_workers(server, 4)
        assert sorted(w["device"] for w in workers) == ["0", "0", "1", "1"]
        seen = loops_by_pid(server, 4)
        assert {w["pid"] for w in workers} == set(seen)
        for worker in workers:  # the device a loop reports is the one its process was given
            env = seen[worker["pid"]]
            assert env == {"pid": worker["pid"], "CUDA_VISIBLE_DEVICES": worker["device"],
                           "FASTDEPLOY_DEVICE": worker["device"], "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        assert worker_info(server) == {w["worker_id"]: w["device"] for w in workers}
        assert "prediction loops per stage: 2 on GPU 0, 2 on GPU 1 (devices: --devices)" in server.log()
        assert "--replicas 3 counts CPU loops" in server.log()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi: auto finds its GPUs")
def test_auto_on_this_machine_means_the_cpu_and_leaves_the_environment_alone():
    with serve(RECIPE, args=["--replicas", "2"], env=ENV) as server:
        workers = meta_workers(server, 2)
        assert [w["device"] for w in workers] == ["cpu", "cpu"]
        for env in loops_by_pid(server, 2).values():
            assert (env["FASTDEPLOY_DEVICE"], env["CUDA_VISIBLE_DEVICES"]) == ("cpu", None)
        assert set(worker_info(server).values()) == {"cpu"}
        assert "prediction loops per stage: 2 on cpu (devices: auto: no GPU found by nvidia-smi -L)" in server.log()


def test_devices_cpu_hides_every_gpu_and_multiplies_replicas():
    with serve(RECIPE, args=["--devices", "cpu", "--replicas-per-device", "2"], env=ENV) as server:
        assert [w["device"] for w in meta_workers(server, 2)] == ["cpu", "cpu"]
        for env in loops_by_pid(server, 2).values():
            assert (env["FASTDEPLOY_DEVICE"], env["CUDA_VISIBLE_DEVICES"]) == ("cpu", "")


def test_a_worker_on_another_host_finds_its_gpus_with_nvidia_smi(tmp_path):
    """`fastdeploy worker` takes the same options: here `auto` (the default) on a PATH whose
    nvidia-smi lists two GPUs, beside an API-only `fastdeploy serve` sharing the store."""
    state = tmp_path / "state"
    with ExitStack() as stack:
        worker = stack.enter_context(serve(RECIPE, command="worker", state_dir=state, ready=False,
                                           env={**ENV, "PATH": fake_nvidia_smi(tmp_path / "bin", 2)}))
        api = stack.enter_context(serve(RECIPE, command="serve", state_dir=state, env=ENV))
        workers = meta_workers(api, 2)
        assert sorted(w["device"] for w in workers) == ["0", "1"]
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in loops_by_pid(api, 2).values()) == ["0", "1"]
        assert "1 on GPU 0, 1 on GPU 1 (devices: nvidia-smi -L)" in worker.log()


@pytest.mark.parametrize("args, says", [
    (["--devices", "gpu0"], "--devices (FASTDEPLOY_DEVICES): 'gpu0': 'gpu0' is not a GPU"),
    (["--devices", "0,0"], "names a GPU twice; use --replicas-per-device"),
    (["--replicas-per-device", "0"], "--replicas-per-device: 0 is below the minimum 1"),
])
def test_bad_device_options_stop_the_command_at_once(args, says):
    for command in ("run", "worker"):
        done = subprocess.run([sys.executable, "-m", "fastdeploy", command, str(RECIPE), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert done.returncode == 2, done.stderr
        assert says in done.stderr and "Traceback" not in done.stderr
