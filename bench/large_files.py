"""Large uploads: MB/s of multipart uploads served against the raw predictor, and peak memory by file size.

The workload (``bench/recipes/hash_file``) hashes each file it is given (SHA-256, 1 MiB reads).
  raw     the predictor itself hashing the same files from disk (page cache), one process
  served  ``fastdeploy run`` with curl clients uploading them (``curl -F f.bin=@FILE /sync``) in a
          closed loop; MB/s = bytes of files answered 200 / seconds
  rss     one upload each of the --rss-mb sizes; peak RSS of every process of the service (sampled
          every 5 ms from /proc), which must not grow with the file size

Usage: python bench/large_files.py [--file-mb 50] [--files 4] [--clients 2] [--seconds 10] [--rss-mb 5,500]
Writes bench/results/large_files.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RECIPE = HERE / "recipes" / "hash_file"


def make_file(path: Path, mb: float) -> Path:
    with open(path, "wb") as f:
        left = int(mb * 1024 * 1024)
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            left -= len(block)
    return path


def raw_speed(files: list[Path], seconds: float) -> float:
    """MB/s of the predictor hashing ``files`` in turn from disk, in this process."""
    spec = importlib.util.spec_from_file_location("hash_file_predictor", RECIPE / "predictor.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.predictor([str(p) for p in files])  # into the page cache, as the served files are
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for path in files:
            module.predictor([str(path)])
            done += path.stat().st_size
    return done / 2**20 / (time.perf_counter() - started)


def tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for c in out for q in tree(int(c))]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return "api" if b"_api" in cmd else "loop" if b"_loop" in cmd else "supervisor"


class Server:
    def __init__(self, python: str, state: Path) -> None:
        self.port = 18900 + os.getpid() % 500
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDEPLOY_")}
        env.update({"FASTDEPLOY_STATE_DIR": str(state), "FASTDEPLOY_MAX_FILE_MB": "2048",
                    "FASTDEPLOY_MAX_UPLOAD_MB": "2048"})
        self.proc = subprocess.Popen(
            [python, "-m", "fastdeploy", "run", str(RECIPE), "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(600):
            try:
                if urllib.request.urlopen(self.url + "/ready", timeout=1).status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("the server did not get ready")

    def upload(self, path: Path) -> tuple[int, str]:
        out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-F", f"{path.name}=@{path}", self.url + "/sync"],
                             capture_output=True, text=True).stdout
        body, _, code = out.rpartition("\n")
        return int(code or 0), body

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=60)


def served_speed(server: Server, files: list[Path], clients: int, seconds: float) -> tuple[float, int]:
    done = [0, 0]  # bytes answered 200, failures
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            path = files[i % len(files)]
            code, _ = server.upload(path)
            with lock:
                done[0 if code == 200 else 1] += path.stat().st_size if code == 200 else 1
            i += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / 2**20 / (time.perf_counter() - started), done[1]


def peak_rss(server: Server, path: Path, check: Callable[[str], bool]) -> dict[str, Any]:
    pids = tree(server.proc.pid)
    idle = {p: rss_mb(p) for p in pids}
    peak = dict(idle)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for p in tree(server.proc.pid):
                peak[p] = max(peak.get(p, 0.0), rss_mb(p))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    code, body = server.upload(path)
    took = time.perf_counter() - started
    time.sleep(0.3)
    stop.set()
    sampler.join()
    assert code == 200 and check(body), (code, body[:300])
    return {"file_mb": round(path.stat().st_size / 2**20), "seconds": round(took, 2),
            "idle_sum_mb": round(sum(idle.values()), 1), "peak_sum_mb": round(sum(peak.values()), 1),
            "peak_by_process_mb": {f"{role(p)}:{p}": round(v, 1) for p, v in peak.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--file-mb", type=float, default=50)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rss-mb", default="5,500")
    parser.add_argument("--out", default=str(HERE / "results" / "large_files.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fd-large-"))
    try:
        files = [make_file(work / f"f{i}.bin", args.file_mb) for i in range(args.files)]
        raw = raw_speed(files, args.seconds)
        print(f"raw predictor from disk: {raw:.0f} MB/s")
        server = Server(args.python, work / "state")
        try:
            served, failures = served_speed(server, files, args.clients, args.seconds)
            print(f"served, {args.clients} curl clients: {served:.0f} MB/s ({served / raw:.2f} of raw), "
                  f"{failures} failures")
            rss = []
            for mb in [float(x) for x in args.rss_mb.split(",")]:
                path = make_file(work / f"rss-{mb:g}.bin", mb)
                digest = hashlib.sha256(path.read_bytes()).hexdigest() if mb <= 600 else ""
                rss.append(peak_rss(server, path, lambda body: digest in body))
                path.unlink()
                print(f"  {rss[-1]}")
        finally:
            server.stop()
        result = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "file_mb": args.file_mb,
                  "clients": args.clients, "seconds": args.seconds, "raw_mb_s": round(raw, 1),
                  "served_mb_s": round(served, 1), "ratio": round(served / raw, 3), "failures": failures, "rss": rss}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
