"""Scale-out benchmark: throughput on Redis with 1 and 2 workers against the embedded store.

    python bench/scaleout.py [--duration 10] [--warmup 2] [--redis URL] [--engine auto|wrk|asyncio]

Workloads (the recipes in bench/recipes/):
  echo        predictor returns its inputs (pure serving overhead), 64 clients
  batch_cost  predictor sleeps 10 ms + 1 ms per item, BATCH_SIZE=32, 256 clients
                (one predictor process tops out at 32 / 0.042 s = 762 items/s)

Setups, each with one API server process (WORKERS=1), each request one item on /sync:
  embedded          `fastdeploy run` (SQLite store, one prediction loop)
  embedded-2loops   `fastdeploy run --replicas 2` (SQLite store, two loops)
  redis-1worker     `fastdeploy serve` + one `fastdeploy worker`, on Redis
  redis-2workers    `fastdeploy serve` + two `fastdeploy worker` processes, on Redis

Without --redis a private redis-server is started on a free port (so other tenants of
a shared Redis do not skew the numbers); if there is no redis-server binary, the one on
127.0.0.1:6379 is used. Prints a table and writes bench/results/scaleout.json.
All processes share this machine's cores: on a small machine the load generator, Redis,
the API server and the workers compete, which caps what a second worker can add to CPU-
bound work (echo); batch_cost is bound by the predictor's sleep and shows the scaling.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402

RESULTS = os.path.join(BENCH, "results")
BODY = json.dumps({"data": [{"text": "hello", "id": 1}]}).encode()
WORKLOADS = {
    "echo": {"recipe": os.path.join(BENCH, "recipes", "echo"), "env": {}, "clients": 64},
    "batch_cost": {"recipe": os.path.join(BENCH, "recipes", "batch_cost"), "env": {"BATCH_SIZE": "32"}, "clients": 256},
}
SETUPS = {  # workers: separate `fastdeploy worker` processes; loops: prediction loops to wait for
    "embedded": {"broker": False, "workers": 0, "loops": 1, "args": []},
    "embedded-2loops": {"broker": False, "workers": 0, "loops": 2, "args": ["--replicas", "2"]},
    "redis-1worker": {"broker": True, "workers": 1, "loops": 1, "args": []},
    "redis-2workers": {"broker": True, "workers": 2, "loops": 2, "args": []},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return 0, b""


def redis_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Processes:
    """The fastdeploy commands of one setup; stopped together (SIGTERM, then SIGKILL of the trees)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(os.path.join(self.folder, f"{name}.log"), "ab")
        proc = subprocess.Popen([sys.executable, "-m", "fastdeploy", *args], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs.append(proc)
        return proc

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def logs(self) -> str:
        out = []
        for name in sorted(os.listdir(self.folder)):
            if name.endswith(".log"):
                with open(os.path.join(self.folder, name), errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-20:]))
        return "\n".join(out)

    def stop(self) -> None:
        children = {p.pid: _children(p.pid) for p in self.procs if p.poll() is None}
        for proc in reversed(self.procs):  # API servers first, then workers
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pids in children.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_ready(procs: Processes, base: str, loops: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive():
            raise RuntimeError("a fastdeploy process exited during start-up\n" + procs.logs())
        status, _ = http("GET", base + "/ready", timeout=2)
        if status == 200:
            status, body = http("GET", base + "/meta", timeout=2)
            if status == 200:
                live = [w for s in json.loads(body)["stages"] for w in s["workers"] if w["ready"]]
                if len(live) >= loops:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout:.0f} s\n" + procs.logs())


def run_one(workload: str, setup: str, redis_url: str, args: argparse.Namespace) -> dict:
    spec, shape = WORKLOADS[workload], SETUPS[setup]
    folder = tempfile.mkdtemp(prefix=f"fd-scaleout-{workload}-{setup}-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
    for name in ("PORT", "WORKERS", "TIMEOUT", "BATCH_SIZE", "MAX_WAIT"):
        env.pop(name, None)
    env.update(spec["env"])
    env.update({"WORKERS": "1",  # one API server process in every setup: the workers are what varies
                "FASTDEPLOY_STATE_DIR": os.path.join(folder, "state"), "FASTDEPLOY_LOG_LEVEL": "warning",
                "PYTHONUNBUFFERED": "1"})
    broker = ""
    if shape["broker"]:
        broker = f"{redis_url}?prefix=fdbench-{uuid.uuid4().hex[:10]}"
        env["FASTDEPLOY_BROKER"] = broker
    where = ["--host", "127.0.0.1", "--port", str(port)]
    procs = Processes(folder)
    base = f"http://127.0.0.1:{port}"
    try:
        if shape["broker"]:
            for i in range(shape["workers"]):
                procs.start(f"worker{i}", ["worker", spec["recipe"]], env)  # workers serve no HTTP: no --port
            procs.start("api", ["serve", spec["recipe"], *where], env)
        else:
            procs.start("run", ["run", spec["recipe"], *where, *shape["args"]], env)
        wait_ready(procs, base, shape["loops"])
        status, body = http("POST", base + "/sync", BODY, timeout=30)
        if status != 200 or json.loads(body).get("success") is not True:
            raise RuntimeError(f"probe failed: HTTP {status} {body[:200]!r}")
        _, meta = http("GET", base + "/meta")
        batch_sizes = [w["batch_size"] for s in json.loads(meta)["stages"] for w in s["workers"]]
        result = loadgen.run_load(base + "/sync", BODY, spec["clients"], args.duration, warmup=args.warmup,
                                  items_per_request=1, engine=args.engine)
        result.update({"workload": workload, "setup": setup, "batch_sizes": batch_sizes})
        return result
    finally:
        procs.stop()
        if broker:
            _delete_prefix(broker)
        shutil.rmtree(folder, ignore_errors=True)


def _delete_prefix(url: str) -> None:
    try:
        from fastdeploy.store.redis import RedisStore

        store = RedisStore(url)
        store.delete_all()
        store.close()
    except Exception as exc:  # a benchmark leftover is not worth failing the run
        print(f"could not delete the benchmark's Redis keys: {exc}", file=sys.stderr)


def start_private_redis() -> tuple[subprocess.Popen | None, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        if redis_answers(6379):
            return None, "redis://127.0.0.1:6379/0"
        raise SystemExit("no redis-server binary and nothing on 127.0.0.1:6379: install Redis or pass --redis URL")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="fd-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not redis_answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("redis-server did not start")
        time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def table(rows: list[dict]) -> str:
    head = f"{'workload':<11} {'setup':<16} {'clients':>7} {'req/s':>8} {'items/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  batch sizes"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['workload']:<11} {r['setup']:<16} failed: {r['error'][:80]}")
            continue
        lines.append(
            f"{r['workload']:<11} {r['setup']:<16} {r['clients']:>7} {r['rps']:>8.0f} {r['items_per_s']:>8.0f} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['errors']:>6}  {r['batch_sizes']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument("--redis", default="", help="redis://HOST:PORT/DB to use (default: a private redis-server)")
    parser.add_argument("--engine", default="auto", choices=["auto", "wrk", "asyncio"])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--setups", default=",".join(SETUPS))
    args = parser.parse_args(argv)
    redis_proc, redis_url = (None, args.redis) if args.redis else start_private_redis()
    rows: list[dict] = []
    started = time.time()
    try:
        for workload in args.workloads.split(","):
            for setup in args.setups.split(","):
                print(f"running {workload} / {setup} ...", flush=True)
                try:
                    rows.append(run_one(workload, setup, redis_url, args))
                except Exception as exc:  # one broken setup should not lose the others' numbers
                    rows.append({"workload": workload, "setup": setup, "error": str(exc)})
                    print(str(exc)[-2000:], file=sys.stderr)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=20)
    print()
    print(table(rows))
    os.makedirs(RESULTS, exist_ok=True)
    out = {
        "benchmark": "scaleout",
        "command": "python bench/scaleout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "redis": redis_url if args.redis else "private redis-server on a free port (--save '' --appendonly no)",
        "engine": rows[0].get("engine") if rows else None,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "wall_s": round(time.time() - started, 1),
        "workloads": {k: {"recipe": os.path.relpath(v["recipe"], REPO), "env": v["env"], "clients": v["clients"]}
                      for k, v in WORKLOADS.items()},
        "setups": SETUPS,
        "rows": rows,
    }
    path = os.path.join(RESULTS, "scaleout.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {os.path.relpath(path, REPO)}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
