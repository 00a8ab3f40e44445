"""Memory soak: run ours on W1 (echo) at 64 clients for N seconds and watch RSS.

    python bench/soak.py                      # 300 s, 64 clients, sample every 10 s
    python bench/soak.py --seconds 60 --interval 5
    python bench/soak.py --recipe recipes/minilm --clients 16    # any recipe folder

Starts `<python> -m fastdeploy run bench/recipes/echo` (this interpreter, like
bench/run.py's "ours"), samples the RSS of its API server process(es), its
prediction loop process(es) and the supervisor separately: idle before the load
(a few samples), every --interval seconds under load, and idle again after.
The load is the closed-loop generator of bench/loadgen.py run back to back in
chunks of --interval seconds (so throughput over time is recorded too).

Verdict per role: the mean RSS of the last minute under load against the mean
of the first minute after warm-up (--warmup seconds, default 30); a role "grew"
when the difference exceeds --tolerance-mb (default 2 MB) and --tolerance-pct
(default 2 %).  The embedded store's folder size on disk is recorded too, its
database file and WAL apart, and after the load the jobs it keeps and the database
bytes per job: W1's answers are /sync ones, kept --sync-result-ttl (20 s by default),
so the folder levels off once that long has passed.
Then ours is stopped by SIGTERM to the supervisor and the time that took is
recorded.  Writes bench/results/soak.json.
"""
import argparse
import datetime
import json
import os
import platform
import runpy
import shutil
import sqlite3
import sys
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import loadgen  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402

RUN_DIR = os.path.join(BENCH, ".runs", "soak")


def log(msg):
    print("[soak %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def role_rss(srv):
    """{role: MB} and {role: [pids]} of ours' processes right now."""
    table = loadgen.proc_table()
    pids = loadgen.server_pids(srv.pgid, srv._roots(), table)
    mb, who = {}, {}
    for p in pids:
        role = systems.ours_role(p)
        mb[role] = mb.get(role, 0.0) + table[p][3] / 2**20
        who.setdefault(role, []).append(p)
    return {k: round(v, 1) for k, v in mb.items()}, who


def dir_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return round(total / 2**20, 1)


def store_files_mb(state_dir):
    """The embedded store's database file and its WAL, in MB (0 when absent)."""
    sizes = []
    for name in ("jobs.sqlite3", "jobs.sqlite3-wal"):
        try:
            sizes.append(round(os.path.getsize(os.path.join(state_dir, name)) / 2**20, 1))
        except OSError:
            sizes.append(0.0)
    return sizes


def jobs_kept(state_dir):
    """Jobs the embedded store holds now (read-only), or None when it cannot be read."""
    try:
        db = sqlite3.connect("file:%s?mode=ro" % os.path.join(state_dir, "jobs.sqlite3"), uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None


def store_summary(samples, last, db_after, wal_after, kept):
    """The state folder under load and after it: peak, last window, and the database's bytes per job kept
    over the last window (after the load, expiry goes on and leaves free pages in the file for reuse)."""
    counted = [s for s in last if s.get("jobs")]
    jobs = mean([s["jobs"] for s in counted]) if counted else 0
    per_job = round(mean([s["db_mb"] for s in counted]) * 2**20 / jobs) if jobs else None
    return {"peak_mb": max([s["store_mb"] for s in samples] or [0.0]),
            "last_window_mean_mb": round(mean([s["store_mb"] for s in last]), 1),
            "last_window_db_mean_mb": round(mean([s.get("db_mb", 0.0) for s in last]), 1),
            "last_window_jobs_mean": round(jobs) if jobs else None,
            "after": {"db_mb": db_after, "wal_mb": wal_after, "jobs_kept": kept},
            "db_bytes_per_job": per_job}


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def slope_mb_per_min(points):
    """Least-squares slope of (t seconds, MB) points, in MB per minute."""
    if len(points) < 2:
        return float("nan")
    mt, mv = mean([t for t, _ in points]), mean([v for _, v in points])
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / den if den else float("nan")


class Load(threading.Thread):
    """Back-to-back closed-loop chunks until stopped or the deadline passed."""

    def __init__(self, url, body, clients, chunk, deadline, engine):
        super().__init__(daemon=True)
        self.url, self.body, self.clients, self.chunk = url, body, clients, chunk
        self.deadline, self.engine = deadline, engine
        self.chunks, self.error = [], None

    def run(self):
        try:
            while True:
                left = self.deadline - time.time()
                if left < 1.0:
                    return
                t0 = time.time()
                r = loadgen.run_load(self.url, self.body, self.clients, min(self.chunk, left), 0.0, 1, self.engine)
                r["t_start"] = t0
                self.chunks.append(r)
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            self.error = e


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0, help="seconds under load (default 300)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples / per load chunk")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before the 'first minute'")
    p.add_argument("--recipe", default=os.path.join(workloads.RECIPES, "echo"))
    p.add_argument("--engine", choices=["auto", "wrk", "asyncio"], default="auto")
    p.add_argument("--tolerance-mb", type=float, default=2.0)
    p.add_argument("--tolerance-pct", type=float, default=2.0)
    p.add_argument("--out", default=os.path.join(BENCH, "results", "soak.json"))
    a = p.parse_args(argv)
    engine = a.engine if a.engine != "auto" else ("wrk" if loadgen.wrk_available() else "asyncio")
    window = min(60.0, max(a.interval, (a.seconds - a.warmup) / 2))  # "a minute", shorter for short soaks

    ours = systems.SYSTEMS["ours"]
    ours.prepare(None, log)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    os.makedirs(RUN_DIR)
    port = loadgen.free_port()
    body = workloads.W1.body()
    settings = {"recipe": os.path.abspath(a.recipe), "env": {}}
    if os.path.abspath(a.recipe) != os.path.join(workloads.RECIPES, "echo"):
        example = runpy.run_path(os.path.join(a.recipe, "example.py"))
        if example.get("input_type", "json") == "file":
            p.error("--recipe: FILE recipes are not supported here (use a JSON recipe)")
        body = json.dumps({"data": [example["example"][0]]}).encode()
    t_start = time.time()
    srv = ours.start(settings, port, RUN_DIR)
    state_dir = os.path.join(RUN_DIR, "recipe", ".fastdeploy")
    samples, chunks, stop = [], [], None
    try:
        srv.wait_ready(timeout=180)
        srv.probe(body, 1)
        log("ours ready in %.1fs on port %d (%s, %d clients, %.0f s, %s)" % (
            time.time() - t_start, port, os.path.relpath(a.recipe), a.clients, a.seconds, engine))
        idle_before = []
        for _ in range(3):
            mb, who = role_rss(srv)
            idle_before.append(mb)
            time.sleep(1.0)
        log("idle: %s  (pids %s)" % (mb, who))
        disk_before = dir_mb(state_dir)

        t0 = time.time()
        load = Load(srv.url, body, a.clients, a.interval, t0 + a.seconds, engine)
        load.start()
        next_at = t0 + a.interval / 2  # sample mid-chunk
        while load.is_alive():
            time.sleep(max(0.0, next_at - time.time()))
            if not load.is_alive():
                break
            if not srv.alive():
                raise RuntimeError("ours died under load\n%s" % srv.log_tail())
            mb, _ = role_rss(srv)
            t = round(time.time() - t0, 1)
            db_mb, wal_mb = store_files_mb(state_dir)
            samples.append({"t": t, "rss_mb": mb, "store_mb": dir_mb(state_dir), "db_mb": db_mb, "wal_mb": wal_mb,
                            "jobs": jobs_kept(state_dir)})
            done = load.chunks[-1] if load.chunks else None
            log("t=%5.0fs  %s%s" % (t, "  ".join("%s %.1f MB" % kv for kv in sorted(mb.items())),
                                    "  | last chunk %.0f req/s p99 %.1f ms errors %d" % (
                                        done["rps"], done["p99_ms"], done["errors"]) if done else ""))
            next_at += a.interval
        load.join()
        if load.error:
            raise load.error
        chunks = load.chunks
        time.sleep(5.0)
        idle_after = []
        for _ in range(3):
            mb, _ = role_rss(srv)
            idle_after.append(mb)
            time.sleep(1.0)
        log("idle after: %s" % mb)
        disk_after = dir_mb(state_dir)
        db_after, wal_after = store_files_mb(state_dir)
        kept = jobs_kept(state_dir)
    finally:
        stop = srv.stop()
        if stop:
            log("stopped in %.2fs (SIGTERM to the supervisor; it exited after %ss; %d SIGKILLed)" % (
                stop["stop_s"], stop["root_exit_s"], stop["killed"]))

    roles = sorted({r for s in samples for r in s["rss_mb"]})
    first = [s for s in samples if a.warmup <= s["t"] < a.warmup + window]
    last = [s for s in samples if s["t"] >= a.seconds - window]
    report = {}
    for role in roles:
        f = [s["rss_mb"].get(role, 0.0) for s in first]
        l_ = [s["rss_mb"].get(role, 0.0) for s in last]
        growth = mean(l_) - mean(f)
        grew = growth > a.tolerance_mb and growth > a.tolerance_pct / 100.0 * mean(f)
        report[role] = {
            "idle_before_mb": round(mean([x.get(role, 0.0) for x in idle_before]), 1),
            "first_window_mean_mb": round(mean(f), 1),
            "last_window_mean_mb": round(mean(l_), 1),
            "peak_mb": round(max(s["rss_mb"].get(role, 0.0) for s in samples), 1),
            "idle_after_mb": round(mean([x.get(role, 0.0) for x in idle_after]), 1),
            "growth_mb": round(growth, 2),
            "slope_mb_per_min_after_warmup": round(slope_mb_per_min(
                [(s["t"], s["rss_mb"].get(role, 0.0)) for s in samples if s["t"] >= a.warmup]), 3),
            "grew": bool(grew),
        }
    total_requests = sum(c["requests"] for c in chunks)
    total_errors = sum(c["errors"] for c in chunks)
    rps = [round(c["rps"], 1) for c in chunks]
    verdict = "GREW: " + ", ".join(r for r in roles if report[r]["grew"]) if any(
        report[r]["grew"] for r in roles) else "no growth"

    print()
    head = ("role", "idle before", "first %.0fs" % window, "last %.0fs" % window, "peak", "idle after",
            "growth", "slope/min", "grew")
    print("%-11s %12s %12s %12s %9s %11s %9s %10s %5s" % head)
    for role in roles:
        r = report[role]
        print("%-11s %9.1f MB %9.1f MB %9.1f MB %6.1f MB %8.1f MB %+6.2f MB %+7.3f MB %5s" % (
            role, r["idle_before_mb"], r["first_window_mean_mb"], r["last_window_mean_mb"], r["peak_mb"],
            r["idle_after_mb"], r["growth_mb"], r["slope_mb_per_min_after_warmup"], "yes" if r["grew"] else "no"))
    print("load: %d requests, %d errors, %.0f req/s mean (chunks %.0f..%.0f req/s); store folder %.1f -> %.1f MB "
          "on disk; stop %.2fs" % (total_requests, total_errors, mean([c["rps"] for c in chunks]),
                                   min(rps or [0]), max(rps or [0]), disk_before, disk_after,
                                   stop["stop_s"] if stop else float("nan")))
    store = store_summary(samples, last, db_after, wal_after, kept)
    print("store: after the load %.1f MB on disk (database %.1f MB, WAL %.1f MB, %s jobs kept); under load at most "
          "%.1f MB, the last %.0f s %.1f MB on average (database %.1f MB for %s jobs: %s bytes per job)" % (
              disk_after, db_after, wal_after, kept, store["peak_mb"], window, store["last_window_mean_mb"],
              store["last_window_db_mean_mb"], store["last_window_jobs_mean"], store["db_bytes_per_job"]))
    print("verdict: %s (last %.0f s under load vs the first %.0f s after %.0f s of warm-up; tolerance %.1f MB "
          "and %.1f%%)" % (verdict, window, window, a.warmup, a.tolerance_mb, a.tolerance_pct))

    out = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": a.seconds,
                 "clients": a.clients, "interval_s": a.interval, "warmup_s": a.warmup, "window_s": window,
                 "recipe": os.path.relpath(a.recipe, os.path.dirname(BENCH)), "engine": engine,
                 "cpus": os.cpu_count(), "python": platform.python_version(),
                 "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
                 "tolerance_mb": a.tolerance_mb, "tolerance_pct": a.tolerance_pct},
        "verdict": verdict, "roles": report,
        "load": {"requests": total_requests, "errors": total_errors, "chunk_rps": rps,
                 "chunk_p99_ms": [round(c["p99_ms"], 2) for c in chunks]},
        "store_dir_mb": {"before": disk_before, "after": disk_after}, "store": store,
        "idle_before": idle_before, "idle_after": idle_after, "samples": samples, "stop": stop,
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    log("wrote %s" % os.path.relpath(a.out))
    return 1 if any(report[r]["grew"] for r in roles) else 0


if __name__ == "__main__":
    sys.exit(main())
