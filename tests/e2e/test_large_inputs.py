"""A large input is not multiplied in memory (#12 point 8): one 40 MB JSON input through /sync on
the echo recipe, and the peak memory each process gains, read from the kernel's own high-water
mark (VmHWM, reset just before the request through /proc/PID/clear_refs).

The API server holds the body, the parsed value and, while orjson parses, its own copy of the
input (3); everywhere else it holds at most two: the value and its encoding, or the stored result
while it is sent a slice at a time. The loop holds at most two. (fastDeploy at f7d60ec: about six
in each process.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from tests.helpers import RECIPES, serve

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
