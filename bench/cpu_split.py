"""Where the cores go while W4 is served: CPU time per process kind (API servers, loops, supervisor)
and of the load generator, over one closed-loop run. On a machine where the load generator shares
the cores, what the API servers and the generator spend bounds how close the loops can come to
the raw-parallel predictor: served/rawP <= (cores - api - generator) / cores.

Usage: python bench/cpu_split.py [w4|w4m] [CLIENTS] [SECONDS]   (recipes/vad, one loop per core)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402  (bench modules, imported from their folder)
import workloads  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for child in out for q in tree(int(child))]


def cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / TICK  # + waited-for children
    except OSError:
        return 0.0


def role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes()
    return "api" if b"_api" in command else "loop" if b"_loop" in command else "supervisor"


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "w4m"
    clients = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    workload = workloads.W4M if kind == "w4m" else workloads.W4
    cores = os.cpu_count() or 1
    port = 19600 + int(time.time()) % 300
    state = tempfile.mkdtemp()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    env.update({"FASTDEPLOY_STATE_DIR": state, "FASTDEPLOY_REPLICAS": str(cores)})
    server = subprocess.Popen([sys.executable, "-m", "fastdeploy", "run", str(HERE.parent / "recipes" / "vad"),
                               "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tempfile.gettempdir(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        pids = tree(server.pid)
        if os.environ.get("PYSPY_LOOP"):  # profile one process of PYSPY_ROLE (loop, api) while the load runs
            loop_pid = next(p for p in pids if role(p) == os.environ.get("PYSPY_ROLE", "loop"))
            subprocess.Popen(["py-spy", "record", "-p", str(loop_pid), "-d", str(int(seconds)), "-r", "250",
                              "--format", "raw", "-o", os.environ["PYSPY_LOOP"], "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = {p: cpu(p) for p in pids}
        me, started = cpu(os.getpid()), time.time()
        result = loadgen.run_load(f"http://127.0.0.1:{port}/sync", workload.make_body(), clients, seconds,
                                  warmup=2.0, engine="asyncio",
                                  content_type=getattr(workload, "content_type", None) or "application/json")
        elapsed = time.time() - started
        spent: dict[str, float] = {}
        for pid in pids:
            spent[role(pid)] = spent.get(role(pid), 0.0) + cpu(pid) - before[pid]
        spent["load generator"] = cpu(os.getpid()) - me
        print(f"{kind}, {clients} clients, {cores} cores: {result.get('items_per_s', result.get('requests', '?'))} "
              f"(loadgen: {dict(list(result.items())[:6])})")
        print("cores used: " + ", ".join(f"{name} {value / elapsed:.2f}" for name, value in spent.items()))
        others = (spent.get("api", 0) + spent["load generator"] + spent.get("supervisor", 0)) / elapsed
        print(f"bound for served / raw-parallel: ({cores} - {others:.2f}) / {cores} = {(cores - others) / cores:.2f}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        subprocess.run(["rm", "-rf", state], check=False)


if __name__ == "__main__":
    main()
