"""Bytes a finished small job costs each store: W1 jobs (`{"data": [{"text": "hello", "id": 1}]}`)
submitted, claimed and finished through the store's own API, then measured.

    python bench/store_bytes.py                       # SQLite, 20,000 /sync and 20,000 /async jobs
    python bench/store_bytes.py --redis redis://127.0.0.1:6379/15 --jobs 5000

SQLite: the pages each table and index holds (the dbstat virtual table), divided by the jobs kept;
"file" is the database file itself (free pages included), without its WAL. Redis: `MEMORY USAGE`
of a finished job's hash, and what the shared indexes (the `finished` zset, ...) grew by, per job;
the prefix used is deleted before and after. Run it with PYTHONPATH pointing at another checkout's
package to measure that version ("before").
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

from fastdeploy.jobs import NewJob, Outcome, encode_inputs, new_job_id

INPUT = {"text": "hello", "id": 1}
OWNER = "addr:127.0.0.1"
ORIGIN = "api-123456-0.sock"  # a /sync job's origin: the API server's bell, as the local doorbell names it


def _jobs(n, sync):
    payload = encode_inputs([INPUT])
    deadline = time.time() + 480.0
    return [NewJob(new_job_id(), payload, 1, 8 if sync else 9, deadline if sync else None, None,
                   ORIGIN if sync else None, OWNER) for _ in range(n)]


def _run_jobs(store, n, sync, batch=64):
    """Submit, claim and finish ``n`` jobs, ``batch`` at a time (as a loop under load would)."""
    result = orjson.dumps([INPUT])
    done = 0
    while done < n:
        jobs = _jobs(min(batch, n - done), sync)
        store.submit(jobs)
        claimed = store.claim(0, len(jobs), "bench-worker", 30.0)
        store.finish([Outcome(c.id, 0, result=result) for c in claimed], "bench-worker")
        done += len(claimed)


def _sqlite(n):
    from fastdeploy.store.sqlite import SQLiteStore

    rows = {}
    for label, sync in (("sync", True), ("async", False)):
        with tempfile.TemporaryDirectory() as folder:
            store = SQLiteStore(Path(folder))
            _run_jobs(store, n, sync)
            store.checkpoint()
            db = store._db()
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = dict(db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
            size = os.path.getsize(store.path)
            store.close()
        rows[label] = {name: b / n for name, b in pages.items() if b / n >= 0.05}
        rows[label]["file"] = size / n
    names = sorted({k for r in rows.values() for k in r}, key=lambda k: (k == "file", k))
    print(f"SQLite, bytes per finished W1 job ({n} jobs of each kind, page size 4096):")
    print(f"  {'table / index':<28}{'/sync':>10}{'/async':>10}")
    for name in names:
        print(f"  {name:<28}{rows['sync'].get(name, 0):>10.1f}{rows['async'].get(name, 0):>10.1f}")


def _publish_ttls(store):
    """What an API server's maintenance does first: the TTLs become known (an earlier version takes one)."""
    try:
        store.maintain(time.time(), 3600.0, 5.0, 30.0)
    except TypeError:
        store.maintain(time.time(), 3600.0, 5.0)


def _redis(url, n):
    import redis

    from fastdeploy.store.redis import RedisStore

    url = url + ("&" if "?" in url else "?") + "prefix=bench-store-bytes"
    store = RedisStore(url)
    client = redis.Redis.from_url(url.split("?")[0])
    store.delete_all()
    _publish_ttls(store)
    print(f"Redis, bytes per finished W1 job ({n} jobs of each kind; MEMORY USAGE, SAMPLES 0):")
    for label, sync in (("/sync", True), ("/async", False)):
        before = {k: client.memory_usage(k, samples=0) or 0 for k in client.scan_iter(match=store.keys.pattern())}
        _run_jobs(store, n, sync)
        after = {k: client.memory_usage(k, samples=0) or 0 for k in client.scan_iter(match=store.keys.pattern())}
        jobs = [k for k in after if k.startswith(store.keys.job_prefix.encode()) and k not in before]
        per_hash = sum(after[k] for k in jobs) / max(1, len(jobs))
        shared = {k.decode(): (after[k] - before.get(k, 0)) / n for k in after if k not in jobs
                  and not k.startswith(store.keys.job_prefix.encode()) and abs(after[k] - before.get(k, 0)) >= n / 20}
        ttl = client.pttl(jobs[0]) / 1000 if jobs else float("nan")
        print(f"  {label}: job hash {per_hash:.0f} B (expires in {ttl:.0f} s);"
              + "".join(f" {k} +{v:.1f} B;" for k, v in sorted(shared.items()))
              + f" total {per_hash + sum(shared.values()):.0f} B")
        store.delete_all()
        _publish_ttls(store)
    store.delete_all()
    store.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=20_000, help="jobs of each kind (/sync, /async)")
    p.add_argument("--redis", default="", help="a Redis URL: measure the Redis store instead (a spare database)")
    a = p.parse_args(argv)
    if a.redis:
        _redis(a.redis, a.jobs)
    else:
        _sqlite(a.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
