"""What an open status page costs the service: CPU time of all its processes per /status.json poll.

The page polls once a second while its tab is visible, so "CPU ms per poll" is also "CPU ms per
second per open page". Measured as the CPU time of the whole process tree (supervisor, API
server, loop) during N back-to-back polls, less what the same tree spends idle in the same time.

Usage: python bench/status_cost.py [POLLS]   (the echo recipe; one API server, one loop)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for child in out for q in tree(int(child))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / TICK


def main() -> None:
    polls = int(sys.argv[1]) if len(sys.argv) > 1 else 600
    port = 18900 + int(time.time()) % 90
    work = Path(tempfile.mkdtemp())
    shutil.copytree(Path(__file__).resolve().parent / "recipes" / "echo", work / "echo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({"WORKERS": "1", "FASTDEPLOY_STATE_DIR": str(work / "state")})
    proc = subprocess.Popen([sys.executable, "-m", "fastdeploy", "run", str(work / "echo"), "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        urllib.request.urlopen(urllib.request.Request(url + "/sync", data=b'{"data": [1, 2, 3]}'), timeout=10).read()
        time.sleep(2)
        pids = tree(proc.pid)
        idle_from, t0 = cpu_seconds(pids), time.perf_counter()
        time.sleep(10)
        idle_rate = (cpu_seconds(pids) - idle_from) / (time.perf_counter() - t0)
        busy_from, t1 = cpu_seconds(pids), time.perf_counter()
        for _ in range(polls):
            urllib.request.urlopen(url + "/status.json", timeout=10).read()
        elapsed = time.perf_counter() - t1
        spent = cpu_seconds(pids) - busy_from - idle_rate * elapsed
        per_poll_ms = 1000 * spent / polls
        print(f"idle service: {100 * idle_rate:.2f} % of a core; {polls} polls in {elapsed:.2f} s "
              f"({1000 * elapsed / polls:.2f} ms each, wall)")
        print(f"CPU per poll, all processes, idle subtracted: {per_poll_ms:.3f} ms "
              f"= {per_poll_ms / 10:.3f} % of one core per open page (one poll a second)")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
