"""One client alone: p50 of /sync and what it costs in CPU, against a bare uvicorn + Starlette echo.

Issue #10 asked for this figure with the default ``SPIN_US`` (the lone-client polling in the
local doorbell) and with ``SPIN_US=0``, beside a bare uvicorn + Starlette app that answers
the same body, on the same machine, in one run. Configurations alternate, one at a time,
each on a fresh state folder, so all of them see the same machine:

  python bench/lone_client.py [--rounds 3] [--duration 6] [--rev REV]

``--rev REV`` (repeatable) adds the package as it was at an earlier commit (``git archive``)
as one more configuration. CPU is the sum of user + system time of the server's processes over the
measured seconds, in cores (1.0 = one core busy the whole time).
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import free_port, proc_table, run_load, server_pids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"data": [1]}'
BARE_APP = '''
import orjson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def sync(request):
    data = orjson.loads(await request.body())["data"]
    return Response(orjson.dumps({"success": True, "prediction": list(data)}),
                    media_type="application/json")

async def ready(request):
    return Response(b"ok")

app = Starlette(routes=[Route("/sync", sync, methods=["POST"]), Route("/ready", ready)])
'''


def _cpu_seconds(pids: List[int]) -> float:
    """User + system seconds used so far by these processes (from /proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _wait_ready(url: str, proc: subprocess.Popen) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered")


def _start(kind: str, port: int, state: str, pythonpath: str, scratch: str) -> Tuple[subprocess.Popen, str]:
    env = dict(os.environ, FASTDEPLOY_STATE_DIR=state)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    if kind == "bare":
        Path(scratch, "bare_echo.py").write_text(BARE_APP)
        cmd = [sys.executable, "-m", "uvicorn", "bare_echo:app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
        ready = f"http://127.0.0.1:{port}/ready"
    else:
        if kind == "spin0":
            env["FASTDEPLOY_SPIN_US"] = "0"  # also read as SPIN_US since this commit; not at f7d60ec
        cmd = [sys.executable, "-m", "fastdeploy", "run", str(ROOT / "bench/recipes/echo"),
               "--host", "127.0.0.1", "--port", str(port)]
        ready = f"http://127.0.0.1:{port}/ready"
    proc = subprocess.Popen(cmd, cwd=scratch, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_ready(ready, proc)
    return proc, f"http://127.0.0.1:{port}/sync"


def _measure(kind: str, duration: float, pythonpath: str) -> Dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as state, tempfile.TemporaryDirectory() as scratch:
        proc, url = _start(kind, port, state, pythonpath, scratch)
        try:
            run_load(url, BODY, 1, 2.0, warmup=1.0, engine="asyncio")  # warm both sides
            pids = server_pids(pgid=proc.pid, table=proc_table())
            before, t0 = _cpu_seconds(pids), time.monotonic()
            one = run_load(url, BODY, 1, duration, warmup=0.0, engine="asyncio")
            cores = (_cpu_seconds(pids) - before) / (time.monotonic() - t0)
            many = run_load(url, BODY, 64, duration, warmup=1.0, engine="asyncio")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return {"p50": one["p50_ms"], "p99": one["p99_ms"], "cores": cores, "rps64": many["rps"]}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--rev", action="append", default=[], help="also measure the package as it was at this commit")
    ap.add_argument("--revs-only", action="store_true", help="only this tree and the --rev commits")
    args = ap.parse_args(argv)
    kinds = [("fastdeploy (default SPIN_US)", "default", "")]
    if not args.revs_only:
        kinds += [("fastdeploy SPIN_US=0", "spin0", ""), ("bare uvicorn + Starlette echo", "bare", "")]
    olds = []
    for rev in args.rev:
        old = tempfile.mkdtemp()
        olds.append(old)
        subprocess.run(f"git archive {rev} fastdeploy | tar -x -C {old}", shell=True, cwd=ROOT, check=True)
        kinds.insert(len(olds), (f"fastdeploy at {rev} (default SPIN_US)", "default", old))
    rows: Dict[str, List[Dict[str, float]]] = {name: [] for name, _, _ in kinds}
    for r in range(args.rounds):
        for name, kind, path in kinds:
            rows[name].append(_measure(kind, args.duration, path))
            m = rows[name][-1]
            print(f"round {r + 1} {name}: p50 {m['p50']:.3f} ms, p99 {m['p99']:.3f} ms, "
                  f"server CPU {m['cores']:.2f} cores at 1 client, {m['rps64']:,.0f} req/s at 64",
                  flush=True)
    print("\n| configuration | 1 client p50 (ms) | server CPU at 1 client (cores) | 64 clients (req/s) |")
    print("| --- | --- | --- | --- |")
    for name, ms in rows.items():
        p50 = ", ".join(f"{m['p50']:.3f}" for m in ms)
        cpu = ", ".join(f"{m['cores']:.2f}" for m in ms)
        rps = ", ".join(f"{m['rps64']:,.0f}" for m in ms)
        print(f"| {name} | {p50} | {cpu} | {rps} |")
    for old in olds:
        subprocess.run(["rm", "-rf", old], check=False)


if __name__ == "__main__":
    main()
