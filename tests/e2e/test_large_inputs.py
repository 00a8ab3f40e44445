"""A large input is not multiplied in memory (#12 point 8): one 40 MB JSON input through /sync on
the echo recipe, and the peak memory each process gains, read from the kernel's own high-water
mark (VmHWM, reset just before the request through /proc/PID/clear_refs).

The API server holds the body, the parsed value and, while orjson parses, its own copy of the
input (3); everywhere else it holds at most two: the value and its encoding, or the stored result
while it is sent a slice at a time. The loop holds at most two. (fastDeploy at f7d60ec: about six
in each process.)"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from fastdeploy.payloads import UPLOAD_MARKER
from tests.helpers import RECIPES, make_file_recipe, serve, wait_until

pytestmark = pytest.mark.timeout(180)

MB = 40
SLACK_MB = 30  # allocator and interpreter noise on top of the copies


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return "api" if b"_api" in command else "loop" if b"_loop" in command else "other"


def _kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def test_a_large_json_input_is_held_at_most_three_times_by_the_api_and_twice_by_the_loop() -> None:
    env = {"FASTDEPLOY_MAX_BODY_MB": "100", "BATCH_SIZE": "1"}
    with serve(RECIPES / "echo", env=env) as server:
        pids = {_role(pid): pid for pid in _children(server.proc.pid)}
        assert set(pids) >= {"api", "loop"}, pids
        body = b'{"data": ["' + b"x" * (MB * 1024 * 1024) + b'"]}'
        base = {}
        for role in ("api", "loop"):
            Path(f"/proc/{pids[role]}/clear_refs").write_text("5")  # the peak starts again from now
            base[role] = _kb(pids[role], "VmRSS")
        answer = requests.post(server.url + "/sync", data=body, headers={"Content-Type": "application/json"},
                               timeout=120)
        assert answer.status_code == 200 and len(answer.content) > MB * 1024 * 1024
        del answer, body
        gained = {role: (_kb(pids[role], "VmHWM") - base[role]) / 1024 for role in ("api", "loop")}
        assert gained["api"] <= 3 * MB + SLACK_MB, gained
        assert gained["loop"] <= 2 * MB + SLACK_MB, gained


LARGE_OUTPUTS = (  # a FILE predictor whose every output is a string of FD_TEST_OUTPUT_MB megabytes
    "import os\n\n\n"
    "def predictor(inputs, batch_size=1):\n"
    "    return ['y' * int(float(os.environ.get('FD_TEST_OUTPUT_MB', '0')) * 1024 * 1024) for _ in inputs]\n"
)


def test_what_only_needs_a_jobs_status_never_reads_its_large_result(tmp_path) -> None:
    """Issue #25 point 2: another key's /result, /cancel of a finished job and the upload sweep
    decide on a job's status and owner alone; with a 50 MB result, the API server's peak memory
    while they run stays far below one copy of it."""
    result_mb = 50
    recipe = make_file_recipe(tmp_path / "recipe", LARGE_OUTPUTS)
    env = {"FD_TEST_OUTPUT_MB": str(result_mb), "BATCH_SIZE": "1"}
    owner, other = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    with serve(recipe, args=["--api-keys", "key-a,key-b"], env=env) as server:
        (api,) = [pid for pid in _children(server.proc.pid) if _role(pid) == "api"]
        answer = requests.post(server.url + "/async", files={"a.txt": ("a.txt", b"x")}, headers=owner, timeout=30)
        job_id = answer.json()["unique_id"]

        def done() -> bool:  # the owner reads its result: that one read may cost a copy
            read = requests.post(server.url + "/result", json={"unique_id": job_id}, headers=owner, timeout=60)
            return read.json()["status"] == "done"

        wait_until(done, 120, "the large result")
        stale = server.state_dir / "files" / job_id  # a finished job's folder, as a loop that died leaves it
        stale.mkdir(parents=True, exist_ok=True)
        (stale / UPLOAD_MARKER).touch()
        Path(f"/proc/{api}/clear_refs").write_text("5")  # the peak starts again from now
        base = _kb(api, "VmRSS")
        for _ in range(3):
            refused = requests.post(server.url + "/result", json={"unique_id": job_id}, headers=other, timeout=30)
            assert refused.status_code == 404, refused.text
            conflict = requests.post(server.url + "/cancel", json={"unique_id": job_id}, headers=owner, timeout=30)
            assert conflict.status_code == 409, conflict.text
        long_ago = time.time() - 3600
        os.utime(stale, (long_ago, long_ago))
        wait_until(lambda: not stale.exists(), 30, "the sweep to remove a finished job's folder")
        gained = (_kb(api, "VmHWM") - base) / 1024
        assert gained < result_mb / 2, f"the API server's peak grew by {gained:.0f} MB"
