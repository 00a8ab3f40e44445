"""The embedded store: one SQLite file (WAL) in the state folder.

Needs no other service. Every process opens its own connection; writes that must be
atomic (claiming, finishing) run in ``BEGIN IMMEDIATE`` transactions. ``synchronous=NORMAL``
keeps every committed job across a crash of any fastDeploy process (not across a power
cut of the machine). After each commit it rings the local doorbells (``local_doorbell``)
of the processes concerned.
"""

from __future__ import annotations

import json
import logging
import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from fastdeploy.bodies import result_document
from fastdeploy.errors import JobExists, OwnerLimitReached, StoreUnavailable
from fastdeploy.jobs import TIMED_OUT_REASON, Binding, ClaimedJob, JobState, JobStatus, JobView, NewJob, Outcome, WebhookState, WorkerInfo
from fastdeploy.state_folder import create_state_folder
from fastdeploy.store.base import MAX_ATTEMPTS, POISON_REASON, Failure, Outbox, Resign, Store, WebhookDelivery
from fastdeploy.store.fairness import WeighedJob, fair_share
from fastdeploy.store.local_doorbell import API_ROLE, MAX_DATAGRAM, Bells, bell_folder, stage_role
from fastdeploy.store.news import id_messages, outcome_entry, outcome_messages

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,  -- rowid: never reused while a row with a higher one exists
    id TEXT NOT NULL UNIQUE,
    stage INTEGER NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload BLOB,  -- inputs up to _INLINE_PAYLOAD bytes; larger ones live in payloads
    n_items INTEGER NOT NULL,
    deadline REAL,
    webhook TEXT,
    origin TEXT,  -- the bell of the API server whose /sync request waits for this job; '' once it ended
    owner TEXT NOT NULL DEFAULT '',  -- the API key (or client address) that submitted it: its lane
    worker TEXT,
    lease_until REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result BLOB,
    reason TEXT,
    error_status INTEGER,
    created REAL NOT NULL,  -- whole seconds (stored as a 4-byte integer)
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_lanes ON jobs(stage, owner, priority, seq) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS jobs_leased ON jobs(worker) WHERE status = 'processing';
-- expiry, oldest first: a result its caller waited for (/sync: the job had an origin) goes sooner than
-- other finished jobs; failures stay as long as any (the status page lists them)
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs(finished)
    WHERE finished IS NOT NULL AND (origin IS NULL OR status != 'done');
CREATE INDEX IF NOT EXISTS jobs_ended_waited ON jobs(finished) WHERE status = 'done' AND origin IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_failed ON jobs(finished) WHERE status = 'failed';
-- the per-key bound counts an owner's unfinished jobs inside the write that adds one (one seek);
-- the status page lists an owner's own failures (another key's flood does not push them out)
CREATE INDEX IF NOT EXISTS jobs_owner_unfinished ON jobs(owner) WHERE status IN ('queued', 'processing');
CREATE INDEX IF NOT EXISTS jobs_owner_failed ON jobs(owner, finished) WHERE status = 'failed';
CREATE TABLE IF NOT EXISTS payloads (
    id TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS results (  -- results over _STREAM_BYTES (jobs.result is NULL then); the value
    id TEXT PRIMARY KEY,              -- is the last column, so its zeroblob is never spelled out in memory
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    stage INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    batch_size INTEGER NOT NULL,
    ready INTEGER NOT NULL,
    seen REAL NOT NULL,
    stats TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (  -- per stage, the lane (owner) the last claim ended with
    stage INTEGER PRIMARY KEY,
    owner TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS webhooks (
    job_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_until REAL,
    status TEXT NOT NULL DEFAULT 'pending',  -- pending (in the outbox), delivered, failed
    last_at REAL  -- when the last attempt ended (never why: that is logged only)
);
CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks(next_at) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS tallies (  -- counters since the store was created: webhooks delivered, failed
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

log = logging.getLogger(__name__)

_LOCK_WAIT_SECONDS = 30.0  # longest a write waits for another writer before 503
# Every connection cuts the WAL file back to this when it starts the WAL over (journal_size_limit
# is a per-connection setting: set on one connection only, a large job's WAL stayed at its size).
_WAL_SIZE_LIMIT = 16 * 1024 * 1024
# A WAL file larger than this (a large job's values passed through it) is cut to nothing by the
# supervisor's next checkpoint once no reader is in it; steady small writes stay below it.
_TRUNCATE_BYTES = 2 * _WAL_SIZE_LIMIT
# New stores free pages incrementally (auto_vacuum): space of expired large values goes back to the
# disk, a slice per checkpoint pass, while more than this many free pages (4 MB) are kept for reuse.
_FREE_PAGES_KEPT = 1024
_VACUUM_PAGES = 4096  # pages one pass gives back at most: bounds how long it holds the write lock
# Checkpoints flush the database file to disk (fsync): tens to hundreds of milliseconds on
# a busy disk. SQLite runs one by default in whichever connection commits the 1000th page,
# which put that stall on an API server's event loop. The supervisor checkpoints from its
# own thread instead (``checkpoint``); request connections only do it as a backstop, if
# the WAL ever reaches this many pages (64 MB) because nobody else did.
_BACKSTOP_CHECKPOINT_PAGES = 16384
_RESTART_PAGES = 4096  # WAL pages (16 MB) from which the supervisor's checkpoint also starts the WAL over


_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL

_INLINE_PAYLOAD = 1024  # bytes of inputs kept in the job's own row
# What a job no longer needs once it has ended, dropped with its outcome (no extra write): its row
# keeps status, result or reason, owner and times. A waited-for job's origin (a bell's name) becomes
# '' rather than NULL: that it had one sets when its result expires (jobs_ended_waited).
_ENDED = ("payload = NULL, worker = NULL, lease_until = NULL, deadline = NULL,"
          " origin = CASE WHEN origin IS NULL THEN NULL ELSE '' END")
# Expiry goes a slice at a time: one write deletes at most this many finished jobs of one kind
# (1 to 2 ms of the write lock), and one maintain() at most _EXPIRE_ROUNDS such slices per kind.
_EXPIRE_SLICE = 500
_EXPIRE_ROUNDS = 10
_OUTAGE_WARN_SECONDS = 60.0  # while the store keeps failing the same way, a warning this often
MAX_LANES = 64  # owners one claim takes turns between (the next claim goes on from there)
# the queued jobs of one lane (stage and owner), in the order its owner chose: from the
# head, then on from a (priority, seq) already read; each is one seek in jobs_lanes
_LANE_COLUMNS = "SELECT seq, id, payload, n_items, deadline, webhook, priority FROM jobs"
_LANE_HEAD = (
    f"{_LANE_COLUMNS} WHERE status = 'queued' AND stage = ?1 AND owner = ?2 ORDER BY priority, seq LIMIT ?3"
)
_LANE_SAME_PRIORITY = (
    f"{_LANE_COLUMNS} WHERE status = 'queued' AND stage = ?1 AND owner = ?2 AND priority = ?3 AND seq > ?4"
    " ORDER BY seq LIMIT ?5"
)
_LANE_LATER_PRIORITY = (
    f"{_LANE_COLUMNS} WHERE status = 'queued' AND stage = ?1 AND owner = ?2 AND priority > ?3"
    " ORDER BY priority, seq LIMIT ?4"
)
# the first and last owner with queued jobs at a stage (two seeks), and the lane the last
# claim ended with: when first and last are the same owner, that lane is the only one
_SPAN = (
    "SELECT (SELECT MIN(owner) FROM jobs WHERE status = 'queued' AND stage = ?1),"
    " (SELECT MAX(owner) FROM jobs WHERE status = 'queued' AND stage = ?1),"
    " (SELECT owner FROM turns WHERE stage = ?1)"
)
# the owners with queued jobs at a stage, in turn: those after the lane the last claim ended
# with, then from the start up to it. Each step is one seek in the jobs_lanes index.
_LANES = """
WITH RECURSIVE
 t(last) AS (SELECT COALESCE((SELECT owner FROM turns WHERE stage = ?1), '')),
 a(owner) AS (
   SELECT (SELECT MIN(owner) FROM jobs WHERE status = 'queued' AND stage = ?1 AND owner > (SELECT last FROM t))
   UNION ALL
   SELECT (SELECT MIN(j.owner) FROM jobs j WHERE j.status = 'queued' AND j.stage = ?1 AND j.owner > a.owner)
   FROM a WHERE a.owner IS NOT NULL LIMIT ?2),
 b(owner) AS (
   SELECT (SELECT MIN(owner) FROM jobs WHERE status = 'queued' AND stage = ?1)
   UNION ALL
   SELECT (SELECT MIN(j.owner) FROM jobs j WHERE j.status = 'queued' AND j.stage = ?1 AND j.owner > b.owner)
   FROM b WHERE b.owner IS NOT NULL AND b.owner < (SELECT last FROM t) LIMIT ?2)
SELECT owner FROM a WHERE owner IS NOT NULL
UNION ALL
SELECT owner FROM b WHERE owner IS NOT NULL AND owner <= (SELECT last FROM t)
"""


# A value larger than this goes into and out of SQLite a slice at a time (incremental blob I/O,
# Python 3.11+): bound as a parameter, SQLite first copies a value whole, and read whole, it
# assembles it in a buffer of its own that Python then copies; a 90 MB input was held twice.
_STREAM_BYTES = 1024 * 1024
_STREAMS = hasattr(sqlite3.Connection, "blobopen")
_WHOLE_UP_TO = _STREAM_BYTES if _STREAMS else 2**62  # larger values are read a slice at a time


def _streamed(value: bytes) -> bool:
    return _STREAMS and len(value) > _STREAM_BYTES


def _fill(db: sqlite3.Connection, table: str, column: str, rowid: int, value: bytes) -> None:
    """Write ``value`` into the zeroblob of its size at (table, column, rowid), a slice at a time."""
    with db.blobopen(table, column, rowid) as blob:
        view = memoryview(value)
        for start in range(0, len(view), _STREAM_BYTES):
            blob.write(view[start:start + _STREAM_BYTES])


def _drain(db: sqlite3.Connection, table: str, column: str, rowid: int, size: int) -> bytes:
    """Read the value at (table, column, rowid) a slice at a time into one buffer."""
    out = bytearray(size)
    with db.blobopen(table, column, rowid, readonly=True) as blob:
        view, done = memoryview(out), 0
        while done < size and (piece := blob.read(min(_STREAM_BYTES, size - done))):
            view[done:done + len(piece)] = piece
            done += len(piece)
    if done != size:  # never within one snapshot; never answer a short value padded with zeros
        raise sqlite3.DatabaseError(f"{table}.{column} row {rowid} held {done} bytes, not {size}")
    return out  # type: ignore[return-value]  # serves wherever these bytes go (unpack, join, send)


def _write_large(db: sqlite3.Connection, table: str, job_id: str, value: bytes) -> None:
    """Insert a job's value into ``table`` (payloads or results: id, then data as the last column,
    where SQLite keeps a zeroblob as a size instead of writing out its zeros in memory)."""
    # OR REPLACE: a row an older version left behind for this id is stale, never a reason to fail
    if not _streamed(value):
        db.execute(f"INSERT OR REPLACE INTO {table} (id, data) VALUES (?, ?)", (job_id, value))
        return
    cursor = db.execute(f"INSERT OR REPLACE INTO {table} (id, data) VALUES (?, zeroblob(?))", (job_id, len(value)))
    _fill(db, table, "data", int(cursor.lastrowid or 0), value)


def _read_result(db: sqlite3.Connection, rowid: int, size: int) -> bytes:
    if _STREAMS:
        return _drain(db, "results", "data", rowid, size)
    found = db.execute("SELECT data FROM results WHERE rowid = ?", (rowid,)).fetchone()  # a Python without blobopen
    return found[0] if found is not None else b""


def _read_payload(db: sqlite3.Connection, job_id: str) -> bytes:
    found = db.execute("SELECT rowid, length(data), CASE WHEN length(data) > ? THEN NULL ELSE data END"
                       " FROM payloads WHERE id = ?", (_WHOLE_UP_TO, job_id)).fetchone()
    if found is None:
        return b""
    rowid, size, data = found
    return data if data is not None else _drain(db, "payloads", "data", rowid, size)


def _inline(payload: bytes) -> Optional[bytes]:
    """Small inputs stay in the job's row (one write less per request); large ones go to the
    payloads table, because SQLite rewrites a whole row whenever its size changes, and every
    status change (claim, requeue) would copy a large input again."""
    return payload if len(payload) <= _INLINE_PAYLOAD else None


@dataclass
class _Row:
    """A queued job as the claim reads it."""

    seq: int
    id: str
    payload: Optional[bytes]
    n_items: int
    deadline: Optional[float]
    stage: int
    owner: str


class _LanePicker:
    """Reads each lane's next job for one claim, in its owner's order; sets timed-out jobs aside.

    A lane is read a page at a time: at first its share of the batch, doubling (up to the
    batch size) whenever the claim wants more of it, so many lanes cost little each.
    """

    def __init__(self, db: sqlite3.Connection, stage: int, limit: int, lanes: int, now: float) -> None:
        self._db, self._stage, self._limit, self._now = db, stage, limit, now
        self._first_page = max(1, -(-limit // max(1, lanes)))  # ceil(limit / lanes)
        self._read: dict[str, list[tuple]] = {}  # rows read and not yet handed out, per lane
        self._after: dict[str, Optional[tuple[int, int]]] = {}  # (priority, seq) of the last row read; None: done
        self._page: dict[str, int] = {}
        self.timed_out: list[tuple[str, Optional[str]]] = []

    def next_job(self, owner: str) -> Optional[WeighedJob[_Row]]:
        """The lane's next live job (None when it has none left)."""
        while True:
            rows = self._read.get(owner) or self._fetch(owner)
            if not rows:
                return None
            seq, job_id, payload, n_items, deadline, webhook, _ = rows.pop(0)
            if deadline is not None and deadline < self._now:
                self.timed_out.append((job_id, webhook))
                continue
            return WeighedJob(n_items, _Row(seq, job_id, payload, n_items, deadline, self._stage, owner))

    def _fetch(self, owner: str) -> list[tuple]:
        if owner in self._after and self._after[owner] is None:
            return []  # read to its end
        page = self._page.get(owner, self._first_page)
        after = self._after.get(owner)
        if after is None:
            rows = self._db.execute(_LANE_HEAD, (self._stage, owner, page)).fetchall()
        else:
            rows = self._db.execute(_LANE_SAME_PRIORITY, (self._stage, owner, *after, page)).fetchall()
            if len(rows) < page:
                rows += self._db.execute(_LANE_LATER_PRIORITY, (self._stage, owner, after[0], page - len(rows))).fetchall()
        self._after[owner] = (rows[-1][6], rows[-1][0]) if len(rows) == page else None
        self._page[owner] = min(2 * page, self._limit)
        self._read[owner] = rows
        return rows

    def claimed(self, row: _Row) -> ClaimedJob:
        payload = row.payload
        if payload is None:  # a large input: in its own table
            payload = _read_payload(self._db, row.id)
        return ClaimedJob(row.id, row.stage, payload, row.n_items, row.deadline, row.owner)


def _rollback(db: sqlite3.Connection) -> None:
    """End a failed write; a rollback that fails too (disk gone) leaves the next ``_begin`` to retry it."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed: %s", exc)


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a state folder made by an earlier version up to this schema."""
    added = {"jobs": (("origin", "TEXT"), ("owner", "TEXT NOT NULL DEFAULT ''")),
             "webhooks": (("status", "TEXT NOT NULL DEFAULT 'pending'"), ("last_at", "REAL"))}
    for table, wanted in added.items():
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not columns:
            continue  # a new store: the schema creates the table whole
        for name, definition in wanted:
            if name not in columns:
                try:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {definition}")
                except sqlite3.OperationalError as exc:  # another process added it meanwhile
                    if "duplicate column" not in str(exc):
                        raise
    db.execute("DROP INDEX IF EXISTS jobs_queue")  # one queue order (by lane) is kept now
    db.execute("DROP INDEX IF EXISTS jobs_finished")  # expiry reads jobs_ended and jobs_ended_waited now


def _held_by_others(db: sqlite3.Connection, outcomes: Sequence[Outcome], worker_id: str) -> set[str]:
    """Of the outcomes' jobs, those another loop holds at the outcome's stage now (its lease ran
    out here and it was claimed again): their inputs at that stage are still being read."""
    stages = {out.id: out.stage for out in outcomes}
    held: set[str] = set()
    ids = list(stages)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        rows = db.execute(
            f"SELECT id, stage FROM jobs WHERE id IN ({','.join('?' * len(chunk))}) AND status = 'processing'"
            " AND worker IS NOT NULL AND worker != ?", (*chunk, worker_id),
        ).fetchall()
        held.update(job_id for job_id, stage in rows if stages[job_id] == stage)
    return held


def _tally(db: sqlite3.Connection, name: str) -> None:
    """Count one more of ``name`` (only when the statement before it changed a row)."""
    if db.execute("SELECT changes()").fetchone()[0]:
        db.execute("INSERT INTO tallies (name, value) VALUES (?, 1)"
                   " ON CONFLICT (name) DO UPDATE SET value = value + 1", (name,))


# an owner's unfinished jobs, counted up to a bound (?2): one seek in jobs_owner_unfinished
_OWNER_UNFINISHED = ("SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE owner = ?1"
                     " AND status IN ('queued', 'processing') LIMIT ?2)")


def _check_owner_limit(db: sqlite3.Connection, jobs: Sequence[NewJob], limit: int) -> None:
    """Inside the write that has just inserted ``jobs``: refuse (OwnerLimitReached, so the write rolls
    back) the jobs that take an owner past ``limit`` unfinished ones, the last of its in ``jobs``."""
    mine: dict[str, list[str]] = {}
    for job in jobs:
        mine.setdefault(job.owner, []).append(job.id)
    refused: list[str] = []
    for owner, ids in mine.items():
        (count,) = db.execute(_OWNER_UNFINISHED, (owner, limit + len(ids))).fetchone()
        over = int(count) - limit
        if over > 0:
            refused += ids[-over:]
    if refused:
        raise OwnerLimitReached(refused, limit)


def _expiry(kind: str) -> tuple[str, str, str]:
    """The statements that delete the oldest finished jobs of one ``kind`` past a cutoff (?1), at most ?2 of
    them (one range of the kind's partial index), with their webhooks' records and large results."""
    oldest = f"FROM jobs WHERE {kind} AND finished < ?1 ORDER BY finished LIMIT ?2"
    return (f"DELETE FROM webhooks WHERE status != 'pending' AND job_id IN (SELECT id {oldest})",  # pending: kept
            f"DELETE FROM results WHERE id IN (SELECT id {oldest})",
            f"DELETE FROM jobs WHERE seq IN (SELECT seq {oldest})")


_EXPIRE_WAITED = _expiry("status = 'done' AND origin IS NOT NULL")  # jobs_ended_waited
_EXPIRE_OTHERS = _expiry("finished IS NOT NULL AND (origin IS NULL OR status != 'done')")  # jobs_ended


def _expiry_cutoffs(now: float, result_ttl: float, waited_ttl: Optional[float]) -> list[tuple[tuple[str, ...], float]]:
    """Each kind of finished job, with the time before which it has expired (a waited-for result
    is never kept longer than any other; a waited-for job that failed is kept as long as any)."""
    waited = result_ttl if waited_ttl is None else min(waited_ttl, result_ttl)
    return [(_EXPIRE_WAITED, now - waited), (_EXPIRE_OTHERS, now - result_ttl)]


def _expire_slice(db: sqlite3.Connection, statements: tuple[str, ...], cutoff: float) -> int:
    """Inside a write: delete the oldest expired jobs of one kind, at most _EXPIRE_SLICE; returns how many."""
    for statement in statements[:-1]:
        db.execute(statement, (cutoff, _EXPIRE_SLICE))
    return int(db.execute(statements[-1], (cutoff, _EXPIRE_SLICE)).rowcount)


def _id_messages(ids: Sequence[str]) -> list[bytes]:
    return id_messages(ids, MAX_DATAGRAM)


class SQLiteStore(Store):
    """Jobs in one SQLite file. Each thread gets its own connection; WAL lets readers run
    beside the one writer, and ``BEGIN IMMEDIATE`` makes every write atomic."""

    backend_errors = (sqlite3.Error, OSError)
    _outage: tuple[str, float] = ("", float("-inf"))  # the failure last warned about, and when

    def __init__(self, state_dir: Path) -> None:
        try:
            create_state_folder(state_dir)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the state folder {state_dir}: {exc}") from None
        self.path = state_dir / "jobs.sqlite3"
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        db = self._connect(timeout=1.0)
        self._create_schema(db)
        db.execute("PRAGMA busy_timeout=0")
        self._local.db = db
        try:
            self._bells = Bells(bell_folder(state_dir))
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the doorbell folder in {state_dir}: {exc}") from None

    def _create_schema(self, db: sqlite3.Connection) -> None:
        """Switch to WAL and create the tables, retrying while other processes do the same: SQLite
        answers "database is locked" at once, without its busy handler, to a journal-mode switch or
        a schema read that would deadlock with another process's, so a busy timeout alone is not
        enough when an API server and a loop open a new state folder together."""
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        while True:
            try:
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect only before the first table
                db.execute("PRAGMA journal_mode=WAL")
                _add_missing_columns(db)
                db.executescript(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise StoreUnavailable(f"cannot open the job store {self.path}: {exc}") from None
                if db.in_transaction:
                    _rollback(db)
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot open the job store {self.path}: {exc}") from None
            time.sleep(0.01 + random.random() * 0.02)

    def _unavailable(self, operation: str, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.IntegrityError)):
            log.error("the job store failed in %s (a bug, not the disk)", operation, exc_info=exc)
        else:
            self._say_outage(operation, exc)
        return StoreUnavailable(f"the job store {self.path.name} failed: {exc}")

    def _not_writable(self, exc: sqlite3.Error) -> StoreUnavailable:
        """The write lock could not be taken: logged as any other failure (an outage, rate-limited;
        a bug with its traceback)."""
        self._unavailable("a write", exc)
        return StoreUnavailable(f"the job store {self.path.name} is not writable: {exc}")

    def _say_outage(self, operation: str, exc: BaseException) -> None:
        """Warn when the store starts failing or fails anew, then once a minute at most: a full disk fails
        every write of every request, and a line each would flood the log (often kept on that disk)."""
        now = time.monotonic()
        said, at = self._outage
        level = logging.DEBUG
        if str(exc) != said or now - at >= _OUTAGE_WARN_SECONDS:
            level, self._outage = logging.WARNING, (str(exc), now)
        log.log(level, "the job store %s failed in %s: %s", self.path, operation, exc)

    # -- plumbing -------------------------------------------------------------
    def _connect(self, timeout: float = 0.0) -> sqlite3.Connection:
        # SQLite's own busy handler sleeps 1, 2, 5, 10 … ms when another process holds the
        # write lock; writes here take tens of microseconds, so _begin retries far sooner.
        try:
            db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_CHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open the job store {self.path}: {exc}") from None
        with self._connections_lock:
            self._connections.append(db)
        return db

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    def _begin(self, db: sqlite3.Connection, wait: bool) -> None:
        """Take the write lock, retrying every 50 µs to 1 ms while another writer has it."""
        if db.in_transaction:  # a COMMIT that failed (disk full) left it open
            _rollback(db)
        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        delay = 0.00005
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not wait and "locked" in str(exc):  # the caller asked not to wait: no outage
                    raise StoreUnavailable(f"the job store {self.path.name} is not writable: {exc}") from None
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise self._not_writable(exc) from None
            except sqlite3.Error as exc:
                raise self._not_writable(exc) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.001)

    @contextmanager
    def _write(self, db: Optional[sqlite3.Connection] = None, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """One atomic write; rings queued inside it are sent after it commits."""
        db = db or self._db()
        self._begin(db, wait)
        self._local.rings = []
        self._local.direct_rings = []
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        try:  # committed: from here on nothing may report the write as failed
            for role, messages in self._local.rings:
                self._bells.ring(role, messages)
            for reader, messages in self._local.direct_rings:
                self._bells.ring_reader(reader, messages)
        except OSError as exc:  # rings are hints; the readers' polls find the jobs
            log.warning("could not ring after a commit: %s", exc)

    def _ring_after_commit(self, role: str, messages: Sequence[bytes] = (b"",)) -> None:
        self._local.rings.append((role, messages))

    def _ring_reader_after_commit(self, reader: str, messages: Sequence[bytes]) -> None:
        self._local.direct_rings.append((reader, messages))

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        return self._db().execute(sql, params).fetchall()

    def upgrade(self, resign: Optional[Resign] = None) -> int:
        """Later-stage payloads an earlier version signed without binding them to their job are
        signed again (the schema itself is upgraded when the store opens)."""
        if resign is None:
            return 0
        changed = 0
        with self._write() as db:
            rows = db.execute("SELECT id, stage, owner, n_items, payload FROM jobs"
                              " WHERE status IN ('queued', 'processing') AND stage > 0").fetchall()
            for job_id, stage, owner, n_items, payload in rows:
                new = resign(payload if payload is not None else _read_payload(db, job_id),
                             Binding(job_id, stage, owner, n_items))
                if new is None:
                    continue
                db.execute("UPDATE jobs SET payload = ? WHERE id = ?", (_inline(new), job_id))
                db.execute("DELETE FROM payloads WHERE id = ?", (job_id,))
                if _inline(new) is None:
                    _write_large(db, "payloads", job_id, new)
                changed += 1
        if changed:
            log.info("signed %d queued chain payload(s) of an earlier version for their jobs", changed)
        return changed

    def checkpoint(self) -> None:
        """Give free pages back to the disk, then copy committed pages from the WAL into the
        database file without waiting for readers and writers; once the WAL holds 16 MB, also
        have it started over, and once its file is larger than a steady load makes it (a large
        job went through), cut it to nothing."""
        try:
            db = self._db()
            self._give_back_free_pages(db)
            ((_, log_pages, _),) = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            if self._wal_bytes() > _TRUNCATE_BYTES:
                # RESTART's work, and the file truncated; with a reader still in the WAL it does what
                # it can without waiting (no busy handler here), and the next pass tries again
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            elif log_pages >= _RESTART_PAGES:
                # Under steady writes the WAL is never found fully copied when a writer starts,
                # so SQLite never starts it over and it grows to the backstop, whose checkpoint
                # then stalls a request connection on a long fsync. RESTART copies the few pages
                # written since the PASSIVE pass (holding writers off only for that short
                # sync) and lets the next writer start the WAL from its beginning.
                db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"could not checkpoint the job store {self.path.name}: {exc}") from None

    def _wal_bytes(self) -> int:
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except FileNotFoundError:
            return 0

    def _give_back_free_pages(self, db: sqlite3.Connection) -> None:
        """Free pages beyond those kept for reuse go back to the disk, a slice at a time, when no one
        else is writing (a store created before auto_vacuum keeps them for reuse instead)."""
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
            return
        (free,) = db.execute("PRAGMA freelist_count").fetchone()
        if free <= _FREE_PAGES_KEPT:
            return
        try:  # a statement of its own, run to its end by executescript (execute frees one page per call)
            db.executescript(f"PRAGMA incremental_vacuum({min(free - _FREE_PAGES_KEPT, _VACUUM_PAGES)})")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            # another writer holds the lock (no busy handler here): the next pass gives them back

    def close(self) -> None:
        self._bells.close()
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()

    # -- API side -------------------------------------------------------------
    def submit(self, jobs: Sequence[NewJob], *, block: bool = True, owner_limit: int = 0) -> bool:
        if not jobs:
            return True
        if not block:  # write now if the file is free this instant; never wait for another writer
            try:
                self._insert(jobs, wait=False, owner_limit=owner_limit)
            except StoreUnavailable:
                return False
            return True
        self._insert(jobs, wait=True, owner_limit=owner_limit)
        return True

    def _insert(self, jobs: Sequence[NewJob], wait: bool, owner_limit: int) -> None:
        """Insert the jobs, or none of them: a job id the store holds (a client may choose its
        own) is JobExists, naming every such id, not a store failure."""
        try:
            self._insert_rows(jobs, wait, owner_limit)
        except sqlite3.IntegrityError:
            taken = self._taken_ids(jobs)
            if not taken:
                raise  # not an id in use: a bug, reported as such by the guard
            raise JobExists(taken) from None

    def _taken_ids(self, jobs: Sequence[NewJob]) -> list[str]:
        """Ids of ``jobs`` the store already holds, or that ``jobs`` holds twice."""
        ids = [j.id for j in jobs]
        held: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            held.update(r[0] for r in self._read(f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(chunk))})",
                                                  chunk))
        seen: set[str] = set()
        taken: list[str] = []
        for job_id in ids:
            if (job_id in held or job_id in seen) and job_id not in taken:
                taken.append(job_id)
            seen.add(job_id)
        return taken

    def _insert_rows(self, jobs: Sequence[NewJob], wait: bool, owner_limit: int) -> None:
        now = int(time.time())  # created: whole seconds take 4 bytes on disk, a fraction 8
        with self._write(wait=wait) as db:
            db.executemany(
                "INSERT INTO jobs (id, stage, status, priority, payload, n_items, deadline, webhook, origin, owner,"
                " created) VALUES (?, 0, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (j.id, j.priority, _inline(j.payload), j.n_items, j.deadline, j.webhook,
                     j.origin, j.owner, now)
                    for j in jobs
                ],
            )
            if owner_limit:  # counted with the new rows, before any large value is written
                _check_owner_limit(db, jobs, owner_limit)
            for job in jobs:
                if _inline(job.payload) is None:
                    _write_large(db, "payloads", job.id, job.payload)
            self._ring_after_commit(stage_role(0))

    def get(self, ids: Sequence[str], owner: Optional[str] = None) -> dict[str, JobView]:
        """In one read transaction: a large result is read from the same snapshot as its job's row
        (between two separate reads it could expire and its row number go to another job's result)."""
        db = self._db()
        if db.in_transaction:  # a COMMIT that failed (disk full) left it open
            _rollback(db)
        views = self._views(db, ids, owner, large=False)
        if views is not None:
            return views  # no large result among them: one statement, as most reads are
        db.execute("BEGIN")
        try:
            views = self._views(db, ids, owner, large=True)
        finally:
            _rollback(db)  # it wrote nothing: ending it either way is the same
        assert views is not None
        return views

    def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        db = self._db()
        if db.in_transaction:  # a COMMIT that failed (disk full) left it open
            _rollback(db)
        states: dict[str, JobState] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            rows = db.execute(f"SELECT id, status, owner FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            states.update((job_id, JobState(JobStatus(status), owner)) for job_id, status, owner in rows)
        return states

    def _views(
        self, db: sqlite3.Connection, ids: Sequence[str], owner: Optional[str], large: bool
    ) -> Optional[dict[str, JobView]]:
        """The jobs' views (only ``owner``'s, when given); None when one has a large result and
        ``large`` is not set (read it again inside a transaction)."""
        views: dict[str, JobView] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = db.execute(
                "SELECT j.id, j.status, j.result, j.reason, j.error_status, j.owner, w.status, w.attempts,"
                " w.last_at, r.rowid, length(r.data) FROM jobs j LEFT JOIN webhooks w ON w.job_id = j.id"
                # a results row counts only for a done job with no result of its own (a row an older
                # version left when it expired its job must not answer for a new job of that id)
                " LEFT JOIN results r ON r.id = j.id AND j.status = 'done' AND j.result IS NULL"
                f" WHERE j.id IN ({marks})" + ("" if owner is None else " AND j.owner = ?"),
                chunk if owner is None else [*chunk, owner],
            ).fetchall()
            for job_id, status, result, reason, error_status, whose, hook, attempts, last_at, rowid, size in rows:
                if rowid is not None:  # a large result: read a slice at a time
                    if not large:
                        return None
                    result = _read_result(db, rowid, size)
                webhook = WebhookState(hook, int(attempts), last_at) if hook is not None else None
                views[job_id] = JobView(job_id, JobStatus(status), result, reason, error_status or 500, whose, webhook)
        return views

    def cancel(
        self, ids: Sequence[str], reason: str, error_status: int, *, status: JobStatus = JobStatus.FAILED,
        running: bool = False,
    ) -> list[str]:
        now = time.time()
        cancelled: list[str] = []
        live = "status IN ('queued', 'processing')" if running else "status = 'queued'"
        with self._write() as db:
            for job_id in ids:
                row = db.execute(f"SELECT stage, webhook FROM jobs WHERE id = ? AND {live}", (job_id,)).fetchone()
                if row is not None:
                    self._fail_locked(db, job_id, row[0], reason, error_status, row[1], now, status)
                    cancelled.append(job_id)
            if cancelled:
                self._ring_after_commit(API_ROLE, _id_messages(cancelled))
        return cancelled

    def unfinished_by_owner(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for sql in ("SELECT owner, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY owner",
                    "SELECT owner, COUNT(*) FROM jobs WHERE status = 'processing' GROUP BY owner"):
            for owner, count in self._read(sql):
                counts[owner] = counts.get(owner, 0) + int(count)
        return counts

    def unfinished(self) -> int:
        # two counts, so each uses its partial index instead of scanning every result kept
        (count,) = self._read(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE status = 'queued')"
            " + (SELECT COUNT(*) FROM jobs WHERE status = 'processing')"
        )[0]
        return int(count)

    def queue_depths(self, stages: int) -> list[int]:
        depths = [0] * stages
        for stage, count in self._read("SELECT stage, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY stage"):
            if 0 <= stage < stages:
                depths[stage] = count
        return depths

    # -- loop side ------------------------------------------------------------
    def claim(self, stage: int, max_items: int, worker_id: str, lease_seconds: float) -> list[ClaimedJob]:
        now = time.time()
        with self._write() as db:
            first, last_lane, turn = db.execute(_SPAN, (stage,)).fetchone()
            if first is None:
                return []  # nothing queued at this stage
            if first == last_lane:
                lanes = [first]
            else:
                lanes = [row[0] for row in db.execute(_LANES, (stage, MAX_LANES)).fetchall()][:MAX_LANES]
            picker = _LanePicker(db, stage, max(1, max_items), len(lanes), now)
            taken = fair_share(lanes, picker.next_job, max_items)
            if taken:
                marks = ",".join("?" * len(taken))
                db.execute(
                    f"UPDATE jobs SET status = 'processing', worker = ?, lease_until = ? WHERE seq IN ({marks})",
                    (worker_id, now + lease_seconds, *(job.seq for _, job in taken)),
                )
                last = taken[-1][0]
                if last != turn:
                    db.execute("INSERT INTO turns (stage, owner) VALUES (?, ?)"
                               " ON CONFLICT(stage) DO UPDATE SET owner = excluded.owner", (stage, last))
            for job_id, webhook in picker.timed_out:
                self._fail_locked(db, job_id, stage, TIMED_OUT_REASON, 504, webhook, now)
            if picker.timed_out:
                self._ring_after_commit(API_ROLE, _id_messages([job_id for job_id, _ in picker.timed_out]))
            return [picker.claimed(job) for _, job in taken]

    def _fail_locked(
        self,
        db: sqlite3.Connection,
        job_id: str,
        stage: int,
        reason: str,
        error_status: int,
        webhook: Optional[str],
        now: float,
        status: JobStatus = JobStatus.FAILED,
    ) -> None:
        db.execute(
            f"UPDATE jobs SET status = ?, reason = ?, error_status = ?, {_ENDED}, finished = ?"
            " WHERE id = ? AND stage = ?",
            (status.value, reason, error_status, now, job_id, stage),
        )
        db.execute("DELETE FROM payloads WHERE id = ?", (job_id,))
        if webhook:
            self._queue_webhook(db, job_id, webhook, result_document(job_id, status, None, reason), now)

    @staticmethod
    def _queue_webhook(db: sqlite3.Connection, job_id: str, url: str, body: bytes, now: float) -> None:
        db.execute(
            "INSERT OR REPLACE INTO webhooks (job_id, url, body, attempts, next_at, status) VALUES (?, ?, ?, 0, ?,"
            " 'pending')",
            (job_id, url, body, now),
        )

    def finish(self, outcomes: Sequence[Outcome], worker_id: str) -> list[str]:
        now = time.time()
        carried: dict[str, list[list]] = {}  # API server's bell -> outcomes its /sync requests wait for
        next_stages: set[int] = set()
        live = "status IN ('processing', 'queued')"
        held: set[str] = set()  # jobs another loop holds at this stage now: their inputs stay
        with self._write() as db:
            for out in outcomes:
                if out.payload is not None:
                    held |= _held_by_others(db, [out], worker_id)
                    cursor = db.execute(
                        "UPDATE jobs SET stage = ?, status = 'queued', payload = ?, n_items = ?, worker = NULL,"
                        f" lease_until = NULL WHERE id = ? AND stage = ? AND {live}",
                        (out.stage + 1, _inline(out.payload), out.n_items, out.id, out.stage),
                    )
                    if cursor.rowcount:
                        db.execute("DELETE FROM payloads WHERE id = ?", (out.id,))
                        if _inline(out.payload) is None:
                            _write_large(db, "payloads", out.id, out.payload)
                        next_stages.add(out.stage + 1)
                    continue
                row = db.execute(
                    "SELECT webhook, origin, payload IS NULL, status = 'processing' AND worker IS NOT NULL"
                    f" AND worker != ? FROM jobs WHERE id = ? AND stage = ? AND {live}",
                    (worker_id, out.id, out.stage),
                ).fetchone()
                if row is None:
                    continue  # already finished elsewhere: deliver once
                webhook, origin, spilled, elsewhere = row
                if elsewhere:
                    held.add(out.id)
                if out.result is not None:
                    large = _streamed(out.result)
                    db.execute(
                        f"UPDATE jobs SET status = 'done', result = ?, {_ENDED}, finished = ? WHERE id = ?",
                        (None if large else out.result, now, out.id),
                    )
                    if large:
                        _write_large(db, "results", out.id, out.result)
                    if spilled:
                        db.execute("DELETE FROM payloads WHERE id = ?", (out.id,))
                    if webhook:
                        body = result_document(out.id, JobStatus.DONE, out.result, None)
                        self._queue_webhook(db, out.id, webhook, body, now)
                    entry = outcome_entry(out.id, JobStatus.DONE, out.result, None, 500)
                else:
                    reason = out.reason or "failed"
                    self._fail_locked(db, out.id, out.stage, reason, out.error_status, webhook, now)
                    entry = outcome_entry(out.id, JobStatus.FAILED, None, reason, out.error_status)
                if origin:
                    carried.setdefault(origin, []).append(entry)
            for stage in next_stages:
                self._ring_after_commit(stage_role(stage))
            for origin, entries in carried.items():  # straight to the API server that waits for them
                self._ring_reader_after_commit(origin, outcome_messages(entries, MAX_DATAGRAM))
        return [out.id for out in outcomes if out.id not in held]

    # -- workers --------------------------------------------------------------
    def heartbeat(self, info: WorkerInfo, lease_seconds: float) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO workers (worker_id, stage, host, pid, batch_size, ready, seen, stats)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (info.worker_id, info.stage, info.host, info.pid, info.batch_size, int(info.ready), info.seen,
                 json.dumps(info.stats)),
            )
            db.execute(
                "UPDATE jobs SET lease_until = ? WHERE worker = ? AND status = 'processing'",
                (info.seen + lease_seconds, info.worker_id),
            )

    def workers(self) -> list[WorkerInfo]:
        found = []
        for wid, stage, host, pid, bs, ready, seen, stats in self._read(
            "SELECT worker_id, stage, host, pid, batch_size, ready, seen, stats FROM workers"
        ):
            try:
                found.append(WorkerInfo(wid, int(stage), host, int(pid), int(bs), bool(ready), float(seen),
                                        dict(json.loads(stats))))
            except (ValueError, TypeError) as exc:  # one mangled row must not hide the others
                log.warning("ignoring an unreadable worker record %r: %s", wid, exc)
        return found

    def release_worker(self, worker_id: str) -> int:
        with self._write() as db:
            db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
            return self._requeue_locked(db, "worker = ?", (worker_id,))

    def _requeue_locked(self, db: sqlite3.Connection, where: str, params: Sequence[object]) -> int:
        """Put leased jobs back in the queue; a job that has killed MAX_ATTEMPTS loops fails instead."""
        now = time.time()
        rows = db.execute(
            f"SELECT id, stage, attempts, webhook FROM jobs WHERE status = 'processing' AND {where}", params
        ).fetchall()
        failed, stages = [], set()
        for job_id, stage, attempts, webhook in rows:
            if attempts + 1 >= MAX_ATTEMPTS:
                self._fail_locked(db, job_id, stage, POISON_REASON.format(n=attempts + 1), 500, webhook, now)
                failed.append(job_id)
            else:
                db.execute(
                    "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL, attempts = attempts + 1"
                    " WHERE id = ?",
                    (job_id,),
                )
                stages.add(stage)
        for stage in stages:
            self._ring_after_commit(stage_role(stage))
        if failed:
            self._ring_after_commit(API_ROLE, _id_messages(failed))
        return len(rows)

    # -- maintenance ----------------------------------------------------------
    def maintain(
        self, now: float, result_ttl: float, worker_timeout: float, waited_ttl: Optional[float] = None,
    ) -> None:
        with self._write() as db:
            dead = [r[0] for r in db.execute("SELECT worker_id FROM workers WHERE seen < ?", (now - worker_timeout,))]
            for worker_id in dead:
                db.execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
                self._requeue_locked(db, "worker = ?", (worker_id,))
            self._requeue_locked(db, "lease_until < ?", (now,))
            cutoffs = _expiry_cutoffs(now, result_ttl, waited_ttl)
            due = [(kind, cutoff) for kind, cutoff in cutoffs if _expire_slice(db, kind, cutoff) == _EXPIRE_SLICE]
        for _ in range(_EXPIRE_ROUNDS - 1):  # more than a slice was due: one more each, a write each
            if not due:
                break
            with self._write() as db:
                due = [(kind, cutoff) for kind, cutoff in due if _expire_slice(db, kind, cutoff) == _EXPIRE_SLICE]

    # -- webhook outbox -------------------------------------------------------
    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
        now = time.time()
        with self._write() as db:
            rows = db.execute(
                "SELECT job_id, url, body, attempts FROM webhooks"
                " WHERE status = 'pending' AND next_at <= ? AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhooks SET lease_until = ? WHERE job_id = ?", [(now + lease_seconds, r[0]) for r in rows]
            )
        return [WebhookDelivery(job_id, url, body, attempts) for job_id, url, body, attempts in rows]

    def webhook_delivered(self, job_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE webhooks SET status = 'delivered', attempts = attempts + 1, lease_until = NULL,"
                       " last_at = ?, body = X'' WHERE job_id = ? AND status = 'pending'", (time.time(), job_id))
            _tally(db, "webhooks_delivered")

    def webhook_retry(self, job_id: str, next_attempt_at: float) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE webhooks SET attempts = attempts + 1, next_at = ?, lease_until = NULL, last_at = ?"
                " WHERE job_id = ? AND status = 'pending'",
                (next_attempt_at, time.time(), job_id),
            )

    def webhook_failed(self, job_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE webhooks SET status = 'failed', attempts = attempts + 1, lease_until = NULL,"
                       " last_at = ?, body = X'' WHERE job_id = ? AND status = 'pending'", (time.time(), job_id))
            _tally(db, "webhooks_failed")

    # -- what an operator sees -------------------------------------------------
    def recent_failures(self, limit: int, owner: Optional[str] = None) -> list[Failure]:
        if owner is None:
            rows = self._read("SELECT finished, id, reason, owner FROM jobs WHERE status = 'failed'"
                              " ORDER BY finished DESC LIMIT ?", (limit,))
        else:  # one seek in jobs_owner_failed
            rows = self._read("SELECT finished, id, reason, owner FROM jobs WHERE status = 'failed' AND owner = ?"
                              " ORDER BY finished DESC LIMIT ?", (owner, limit))
        return [Failure(at or 0.0, job_id, reason or "", owner or "") for at, job_id, reason, owner in rows]

    def outbox(self) -> Outbox:
        ((pending,),) = self._read("SELECT count(*) FROM webhooks WHERE status = 'pending'")
        tallies = dict(self._read("SELECT name, value FROM tallies"))
        return Outbox(pending, tallies.get("webhooks_delivered", 0), tallies.get("webhooks_failed", 0))
