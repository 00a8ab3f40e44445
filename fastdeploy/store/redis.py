"""The scale-out store: jobs, leases, results and the webhook outbox in one Redis.

Any number of API servers and prediction loops, on any hosts, share one Redis. The
atomic steps (submit, claim, finish, requeue, heartbeat) are Lua scripts, so two
processes never take the same job and a job's first outcome is the only one recorded.

One Redis database serves one recipe. To serve several recipes from one database give
each a prefix: ``redis://host:6379/0?prefix=NAME`` (default ``fastdeploy``); every key
this module writes starts with ``NAME:``.

The scripts also ring the doorbells (``redis_doorbell``): a token on a short per-stage
list that idle loops ``BLPOP``, and pub/sub messages with finished jobs for the API
servers. Both are hints only; the job hashes are the truth.

Clocks: leases and deadlines compare wall-clock times written by different hosts, so
keep the hosts' clocks in sync (NTP); a skew shortens or lengthens leases by as much.

This module and ``redis_doorbell`` are the only ones that import ``redis``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - depends on the install
    from fastdeploy.errors import SettingsError

    raise SettingsError(
        'the Redis broker needs the redis package: pip install "fastdeploy[redis]"'
    ) from exc

from fastdeploy.bodies import result_document
from fastdeploy.errors import JobExists, SettingsError, StoreUnavailable
from fastdeploy.jobs import TIMED_OUT_REASON, ClaimedJob, JobStatus, JobView, NewJob, Outcome, WebhookState, WorkerInfo
from fastdeploy.store.base import MAX_ATTEMPTS, POISON_REASON, Failure, Outbox, Store, WebhookDelivery

log = logging.getLogger(__name__)

# -- key names: every key this store touches, in one place --------------------------
DEFAULT_PREFIX = "fastdeploy"


@dataclass(frozen=True)
class Keys:
    """Names of every Redis key under one prefix.

    Fixed keys are attributes; per-job, per-stage and per-worker keys are a prefix plus
    the id (the Lua scripts receive the prefixes, never spell key names themselves).
    """

    prefix: str

    # fixed keys
    @property
    def seq(self) -> str:  # INCR counter: FIFO order of submission
        return f"{self.prefix}:seq"

    @property
    def leased(self) -> str:  # zset: job id -> lease_until (jobs being predicted)
        return f"{self.prefix}:leased"

    @property
    def finished(self) -> str:  # zset: job id -> finished time (result expiry)
        return f"{self.prefix}:finished"

    @property
    def outbox(self) -> str:  # zset: job id -> when its webhook is due (a lease pushes it later)
        return f"{self.prefix}:webhooks"

    @property
    def stages(self) -> str:  # set: stages that have a queue (for counting unfinished jobs)
        return f"{self.prefix}:stages"

    @property
    def config(self) -> str:  # hash: result_ttl, as last set by an API server's maintenance
        return f"{self.prefix}:config"

    @property
    def workers(self) -> str:  # hash: worker id -> JSON WorkerInfo
        return f"{self.prefix}:workers"

    @property
    def seen(self) -> str:  # zset: worker id -> last heartbeat time
        return f"{self.prefix}:seen"

    @property
    def turns(self) -> str:  # hash: stage -> the lane (owner) its last claim ended with
        return f"{self.prefix}:turns"

    @property
    def failures(self) -> str:  # list: the last FAILURES_KEPT failed jobs, newest first, as JSON [time, id, reason]
        return f"{self.prefix}:failures"

    @property
    def tallies(self) -> str:  # hash: counters since the store was created (webhooks delivered, failed)
        return f"{self.prefix}:tallies"

    @property
    def results(self) -> str:  # pub/sub channel: newline-separated ids of finished jobs nobody waits for here
        return f"{self.prefix}:results"

    def results_for(self, origin: str) -> str:  # pub/sub channel of one API server: outcomes it waits for
        return f"{self.prefix}:results:{origin}"

    # key families: prefix + id
    @property
    def job_prefix(self) -> str:  # hash per job
        return f"{self.prefix}:job:"

    @property
    def queue_prefix(self) -> str:  # zset per lane (stage:owner): queued job ids, score priority * 1e12 + seq
        return f"{self.prefix}:queue:"

    @property
    def lanes_prefix(self) -> str:  # zset per stage: owners with queued jobs (all score 0: in name order)
        return f"{self.prefix}:lanes:"

    @property
    def held_prefix(self) -> str:  # set per worker: ids of the jobs it holds
        return f"{self.prefix}:held:"

    @property
    def bell_prefix(self) -> str:  # list per stage: "jobs waiting" tokens idle loops BLPOP
        return f"{self.prefix}:bell:"

    @property
    def hook_prefix(self) -> str:  # hash per pending webhook: url, attempts
        return f"{self.prefix}:webhook:"

    def job(self, job_id: str) -> str:
        return self.job_prefix + job_id

    def queue(self, stage: int, owner: str = "") -> str:
        return f"{self.queue_prefix}{stage}:{owner}"

    def lanes(self, stage: int) -> str:
        return self.lanes_prefix + str(stage)

    def held(self, worker_id: str) -> str:
        return self.held_prefix + worker_id

    def bell(self, stage: int) -> str:
        return self.bell_prefix + str(stage)

    def hook(self, job_id: str) -> str:
        return self.hook_prefix + job_id

    def pattern(self) -> str:
        """SCAN pattern matching every key of this prefix."""
        return f"{self.prefix}:*"

    def script_keys(self) -> list[str]:
        """KEYS[1..11] of every script, in the order _LUA_PRELUDE names them."""
        return [self.seq, self.leased, self.finished, self.outbox, self.stages, self.config, self.workers, self.seen,
                self.turns, self.failures, self.tallies]

    def script_prefixes(self) -> list[str]:
        """ARGV[1..7] of every script, in the order _LUA_PRELUDE names them."""
        return [self.job_prefix, self.queue_prefix, self.held_prefix, self.bell_prefix, self.hook_prefix, self.results,
                self.lanes_prefix]


# -- Lua ------------------------------------------------------------------------------
# Shared by every script: key names from KEYS/ARGV, and the steps several scripts take.
_LUA_PRELUDE = """
local K_SEQ, K_LEASED, K_FINISHED, K_OUTBOX = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_STAGES, K_CONFIG, K_WORKERS, K_SEEN, K_TURNS = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_FAILURES, K_TALLIES = KEYS[10], KEYS[11]
local P_JOB, P_QUEUE, P_HELD, P_BELL, P_HOOK, CH_RESULTS = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local P_LANES = ARGV[7]
local A = 8  -- first argument of the script itself
local SCORE_SCALE = 1000000000000
local BELL_TOKENS = 16
local BELL_TTL = 60
local FAILURES_KEPT = 50

local function ring_jobs(stage)
  local key = P_BELL .. stage
  redis.call('RPUSH', key, '1')
  redis.call('LTRIM', key, -BELL_TOKENS, -1)
  redis.call('EXPIRE', key, BELL_TTL)
end

local function ring_results(ids)
  if #ids > 0 then redis.call('PUBLISH', CH_RESULTS, table.concat(ids, '\\n')) end
end

local function lane(stage, owner)
  return P_QUEUE .. stage .. ':' .. (owner or '')
end

-- Take a job out of its lane; a lane left empty leaves the stage's set of lanes.
local function dequeue(id, stage, owner)
  local key = lane(stage, owner)
  redis.call('ZREM', key, id)
  if redis.call('ZCARD', key) == 0 then redis.call('ZREM', P_LANES .. stage, owner or '') end
end

local function enqueue(id, stage, priority, seq, owner)
  redis.call('ZADD', lane(stage, owner), tonumber(priority) * SCORE_SCALE + tonumber(seq), id)
  redis.call('ZADD', P_LANES .. stage, 0, owner or '')
  redis.call('SADD', K_STAGES, stage)
end

local function unlease(id, worker)
  redis.call('ZREM', K_LEASED, id)
  if worker and worker ~= '' then redis.call('SREM', P_HELD .. worker, id) end
end

-- End a job for good (done or failed): drop its inputs, index it for expiry, queue its webhook.
local function finalize(id, now, fields)
  local jk = P_JOB .. id
  local f = redis.call('HMGET', jk, 'stage', 'status', 'worker', 'webhook', 'owner')
  if f[2] == 'queued' then dequeue(id, f[1], f[5]) end
  unlease(id, f[3])
  redis.call('HDEL', jk, 'payload', 'lease_until')
  redis.call('HSET', jk, 'worker', '', 'finished', now, unpack(fields))
  redis.call('ZADD', K_FINISHED, now, id)
  if fields[2] == 'failed' then
    redis.call('LPUSH', K_FAILURES, cjson.encode({tonumber(now), id, fields[4]}))
    redis.call('LTRIM', K_FAILURES, 0, FAILURES_KEPT - 1)
  end
  local ttl = tonumber(redis.call('HGET', K_CONFIG, 'result_ttl'))
  if ttl then redis.call('PEXPIRE', jk, math.floor(ttl * 1000)) end
  if f[4] and f[4] ~= '' then
    redis.call('HSET', P_HOOK .. id, 'url', f[4], 'attempts', 0, 'status', 'pending', 'last_error', '')
    redis.call('ZADD', K_OUTBOX, now, id)
  end
end

-- Put a leased job back in the queue, or fail it once it has cost MAX_ATTEMPTS loops.
local function requeue(id, now, max_attempts, poison, failed, rings)
  local jk = P_JOB .. id
  local f = redis.call('HMGET', jk, 'stage', 'worker', 'attempts', 'priority', 'seq', 'owner')
  local attempts = tonumber(f[3] or '0') + 1
  if attempts >= max_attempts then
    local reason = string.gsub(poison, '{n}', tostring(attempts))
    finalize(id, now, {'status', 'failed', 'reason', reason, 'error_status', '500'})
    failed[#failed + 1] = id
  else
    unlease(id, f[2])
    redis.call('HDEL', jk, 'lease_until')
    redis.call('HSET', jk, 'status', 'queued', 'worker', '', 'attempts', attempts)
    enqueue(id, f[1], f[4], f[5], f[6])
    rings[f[1]] = true
  end
end
"""

# ARGV[A..]: now, then (id, priority, payload, n_items, deadline, webhook, origin, owner) per job;
# origin: the API server whose /sync request waits for the job ('' when none does).
# Returns the count, or (writing nothing) the ids already held or repeated: the caller's JobExists.
_LUA_SUBMIT = """
local now = ARGV[A]
local count = (#ARGV - A) / 8
local taken, seen = {}, {}
for i = A + 1, #ARGV, 8 do
  local id = ARGV[i]
  if seen[id] or redis.call('EXISTS', P_JOB .. id) == 1 then taken[#taken + 1] = id end
  seen[id] = true
end
if #taken > 0 then return taken end
local last = redis.call('INCRBY', K_SEQ, count)
local seq = last - count
for i = A + 1, #ARGV, 8 do
  seq = seq + 1
  local id = ARGV[i]
  redis.call('HSET', P_JOB .. id, 'stage', '0', 'status', 'queued', 'priority', ARGV[i + 1], 'seq', seq,
    'payload', ARGV[i + 2], 'n_items', ARGV[i + 3], 'deadline', ARGV[i + 4], 'webhook', ARGV[i + 5],
    'origin', ARGV[i + 6], 'owner', ARGV[i + 7], 'attempts', '0', 'created', now)
  enqueue(id, '0', ARGV[i + 1], seq, ARGV[i + 7])
end
ring_jobs('0')
return count
"""

# ARGV[A..]: stage, max_items, worker, now, lease_until, timed-out reason, scan limit, max lanes
# Returns (id, payload, n_items, deadline) per claimed job, flattened.
# Fair share (as fastdeploy/store/fairness.py): one job per lane (owner) per round, the lanes
# in name order starting after the one the last claim ended with; within a lane, priority then arrival.
_LUA_CLAIM = """
local stage, max_items, worker = ARGV[A], tonumber(ARGV[A + 1]), ARGV[A + 2]
local now, lease_until, reason, scan_limit = ARGV[A + 3], ARGV[A + 4], ARGV[A + 5], tonumber(ARGV[A + 6])
local max_lanes = tonumber(ARGV[A + 7])
local nnow = tonumber(now)
local lanes_key = P_LANES .. stage
local last = redis.call('HGET', K_TURNS, stage) or ''
local lanes = redis.call('ZRANGEBYLEX', lanes_key, '(' .. last, '+', 'LIMIT', 0, max_lanes)
if #lanes < max_lanes then
  for _, owner in ipairs(redis.call('ZRANGEBYLEX', lanes_key, '-', '[' .. last, 'LIMIT', 0, max_lanes - #lanes)) do
    lanes[#lanes + 1] = owner
  end
end
local out, timed_out = {}, {}
local items, taken, scanned = 0, 0, 0
local ended = nil

-- the lane's next live job: (id, fields) or nil; stale index entries and timed-out jobs are cleared
local function next_job(owner)
  local queue = lane(stage, owner)
  while scanned < scan_limit do
    local ids = redis.call('ZRANGE', queue, 0, 0)
    if #ids == 0 then
      redis.call('ZREM', lanes_key, owner)
      return nil
    end
    local id = ids[1]
    scanned = scanned + 1
    local f = redis.call('HMGET', P_JOB .. id, 'status', 'stage', 'n_items', 'deadline', 'payload')
    if f[1] ~= 'queued' or f[2] ~= stage then
      redis.call('ZREM', queue, id)  -- stale index entry (expired or moved on)
    elseif f[4] and f[4] ~= '' and tonumber(f[4]) < nnow then
      finalize(id, now, {'status', 'failed', 'reason', reason, 'error_status', '504'})
      timed_out[#timed_out + 1] = id
    else
      return id, f
    end
  end
  return nil
end

local live = lanes
while #live > 0 and items < max_items do
  local still = {}
  for _, owner in ipairs(live) do
    if taken > 0 and items >= max_items then break end
    local id, f = next_job(owner)
    local n = id and tonumber(f[3])
    if id and not (taken > 0 and items + n > max_items) then  -- a job too big for what is left: its lane sits out
      dequeue(id, stage, owner)
      redis.call('HSET', P_JOB .. id, 'status', 'processing', 'worker', worker, 'lease_until', lease_until)
      redis.call('ZADD', K_LEASED, lease_until, id)
      redis.call('SADD', P_HELD .. worker, id)
      out[#out + 1] = id
      out[#out + 1] = f[5]
      out[#out + 1] = f[3]
      out[#out + 1] = f[4] or ''
      taken = taken + 1
      items = items + n
      ended = owner
      still[#still + 1] = owner
    end
  end
  live = still
end
if ended and ended ~= last then redis.call('HSET', K_TURNS, stage, ended) end
ring_results(timed_out)
return out
"""

# ARGV[A..]: now, then (id, stage, kind, data, extra) per outcome;
# kind 'next' (data = payload, extra = n_items), 'done' (data = result), 'failed' (data = reason, extra = status)
_LUA_FINISH = """
local now = ARGV[A]
local finished, rings, carried = {}, {}, {}
local function tell(origin, id, entry)
  if origin and origin ~= '' then  -- straight to the API server that waits, outcome included
    carried[origin] = carried[origin] or {}
    table.insert(carried[origin], entry)
  else
    finished[#finished + 1] = id
  end
end
for i = A + 1, #ARGV, 5 do
  local id, stage, kind, data, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local jk = P_JOB .. id
  local f = redis.call('HMGET', jk, 'status', 'stage', 'worker', 'priority', 'seq', 'origin', 'owner')
  if (f[1] == 'processing' or f[1] == 'queued') and f[2] == stage then
    if kind == 'next' then
      if f[1] == 'queued' then dequeue(id, stage, f[7]) end
      unlease(id, f[3])
      local nxt = tostring(tonumber(stage) + 1)
      redis.call('HDEL', jk, 'lease_until')
      redis.call('HSET', jk, 'stage', nxt, 'status', 'queued', 'payload', data, 'n_items', extra, 'worker', '')
      enqueue(id, nxt, f[4], f[5], f[7])
      rings[nxt] = true
    elseif kind == 'done' then
      finalize(id, now, {'status', 'done', 'result', data})
      tell(f[6], id, {id, 'done', data, '', 500})
    else
      finalize(id, now, {'status', 'failed', 'reason', data, 'error_status', extra})
      tell(f[6], id, {id, 'failed', '', data, tonumber(extra)})
    end
  end
end
for stage, _ in pairs(rings) do ring_jobs(stage) end
ring_results(finished)
for origin, entries in pairs(carried) do
  redis.call('PUBLISH', CH_RESULTS .. ':' .. origin, '\1' .. cmsgpack.pack(entries))
end
return #finished
"""

# ARGV[A..]: now, reason, error status, status, running ('1': jobs being predicted too), then the ids
_LUA_CANCEL = """
local now, reason, error_status, status, running = ARGV[A], ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4]
local cancelled = {}
for i = A + 5, #ARGV do
  local id = ARGV[i]
  local current = redis.call('HGET', P_JOB .. id, 'status')
  if current == 'queued' or (running == '1' and current == 'processing') then
    finalize(id, now, {'status', status, 'reason', reason, 'error_status', error_status})
    cancelled[#cancelled + 1] = id
  end
end
ring_results(cancelled)
return cancelled
"""

# ARGV[A..]: mode, now, max_attempts, poison reason template, then
#   mode 'worker': worker id, seen cutoff ('' = release unconditionally)
#   mode 'lapsed': job ids whose lease may have run out
# Returns how many jobs were taken back (requeued or failed as poison).
_LUA_REQUEUE = """
local mode, now, max_attempts, poison = ARGV[A], ARGV[A + 1], tonumber(ARGV[A + 2]), ARGV[A + 3]
local nnow = tonumber(now)
local failed, rings = {}, {}
local count = 0
if mode == 'worker' then
  local worker, cutoff = ARGV[A + 4], ARGV[A + 5]
  if cutoff ~= '' then
    local seen = redis.call('ZSCORE', K_SEEN, worker)
    if seen and tonumber(seen) >= tonumber(cutoff) then return -1 end  -- it heartbeated meanwhile
  end
  redis.call('HDEL', K_WORKERS, worker)
  redis.call('ZREM', K_SEEN, worker)
  local held = P_HELD .. worker
  for _, id in ipairs(redis.call('SMEMBERS', held)) do
    local f = redis.call('HMGET', P_JOB .. id, 'status', 'worker')
    if f[1] == 'processing' and f[2] == worker then
      requeue(id, now, max_attempts, poison, failed, rings)
      count = count + 1
    end
  end
  redis.call('DEL', held)
else
  for i = A + 4, #ARGV do
    local id = ARGV[i]
    local f = redis.call('HMGET', P_JOB .. id, 'status', 'lease_until')
    if f[1] ~= 'processing' then
      redis.call('ZREM', K_LEASED, id)  -- stale index entry
    elseif f[2] and f[2] ~= '' and tonumber(f[2]) < nnow then
      requeue(id, now, max_attempts, poison, failed, rings)
      count = count + 1
    end
  end
end
for stage, _ in pairs(rings) do ring_jobs(stage) end
ring_results(failed)
return count
"""

# ARGV[A..]: worker id, JSON info, seen, lease_until
_LUA_HEARTBEAT = """
local worker, info, seen, lease_until = ARGV[A], ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
redis.call('HSET', K_WORKERS, worker, info)
redis.call('ZADD', K_SEEN, seen, worker)
local held = P_HELD .. worker
for _, id in ipairs(redis.call('SMEMBERS', held)) do
  local jk = P_JOB .. id
  local f = redis.call('HMGET', jk, 'status', 'worker')
  if f[1] == 'processing' and f[2] == worker then
    redis.call('HSET', jk, 'lease_until', lease_until)
    redis.call('ZADD', K_LEASED, lease_until, id)
  else
    redis.call('SREM', held, id)
  end
end
return 1
"""

# ARGV[A..]: cutoff, limit. Deletes finished jobs older than cutoff; returns how many.
_LUA_EXPIRE = """
local ids = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', '(' .. ARGV[A], 'LIMIT', 0, tonumber(ARGV[A + 1]))
for _, id in ipairs(ids) do
  redis.call('DEL', P_JOB .. id, P_HOOK .. id)
  redis.call('ZREM', K_FINISHED, id)
  redis.call('ZREM', K_OUTBOX, id)
end
return #ids
"""

# ARGV[A..]: now, lease_until, limit. Returns (id, url, attempts) per leased delivery, flattened.
_LUA_CLAIM_WEBHOOKS = """
local ids = redis.call('ZRANGEBYSCORE', K_OUTBOX, '-inf', ARGV[A], 'LIMIT', 0, tonumber(ARGV[A + 2]))
local out = {}
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', P_HOOK .. id, 'url', 'attempts')
  if f[1] then
    redis.call('ZADD', K_OUTBOX, ARGV[A + 1], id)
    out[#out + 1] = id
    out[#out + 1] = f[1]
    out[#out + 1] = f[2] or '0'
  else
    redis.call('ZREM', K_OUTBOX, id)
  end
end
return out
"""

# ARGV[A..]: job id, next attempt time
_LUA_WEBHOOK_RETRY = """
local id = ARGV[A]
if redis.call('HGET', P_HOOK .. id, 'status') == 'pending' then
  redis.call('HINCRBY', P_HOOK .. id, 'attempts', 1)
  redis.call('HSET', P_HOOK .. id, 'last_error', ARGV[A + 2])
  redis.call('ZADD', K_OUTBOX, ARGV[A + 1], id)
end
return 1
"""

# ARGV[A..]: job id, final status (delivered or failed), error. Takes the webhook out of the outbox for good.
_LUA_WEBHOOK_END = """
local id = ARGV[A]
redis.call('ZREM', K_OUTBOX, id)
if redis.call('HGET', P_HOOK .. id, 'status') == 'pending' then
  redis.call('HINCRBY', K_TALLIES, 'webhooks_' .. ARGV[A + 1], 1)
  redis.call('HINCRBY', P_HOOK .. id, 'attempts', 1)
  redis.call('HSET', P_HOOK .. id, 'status', ARGV[A + 1], 'last_error', ARGV[A + 2])
end
return 1
"""

# Returns the number of jobs queued (any stage) or leased.
_LUA_UNFINISHED = """
local total = redis.call('ZCARD', K_LEASED)
for _, stage in ipairs(redis.call('SMEMBERS', K_STAGES)) do
  for _, owner in ipairs(redis.call('ZRANGE', P_LANES .. stage, 0, -1)) do
    total = total + redis.call('ZCARD', lane(stage, owner))
  end
end
return total
"""

# Returns (owner, count) pairs, flattened: jobs queued or processing per owner.
_LUA_BY_OWNER = """
local counts = {}
for _, stage in ipairs(redis.call('SMEMBERS', K_STAGES)) do
  for _, owner in ipairs(redis.call('ZRANGE', P_LANES .. stage, 0, -1)) do
    counts[owner] = (counts[owner] or 0) + redis.call('ZCARD', lane(stage, owner))
  end
end
for _, id in ipairs(redis.call('ZRANGE', K_LEASED, 0, -1)) do
  local owner = redis.call('HGET', P_JOB .. id, 'owner')
  if owner then counts[owner] = (counts[owner] or 0) + 1 end
end
local out = {}
for owner, n in pairs(counts) do
  if n > 0 then
    out[#out + 1] = owner
    out[#out + 1] = n
  end
end
return out
"""

# ARGV[A..]: number of stages. Returns the jobs queued at each stage (every lane).
_LUA_DEPTHS = """
local depths = {}
for stage = 0, tonumber(ARGV[A]) - 1 do
  local total = 0
  for _, owner in ipairs(redis.call('ZRANGE', P_LANES .. stage, 0, -1)) do
    total = total + redis.call('ZCARD', lane(stage, owner))
  end
  depths[#depths + 1] = total
end
return depths
"""

# -- tuning -----------------------------------------------------------------------------
CONNECT_TIMEOUT = 2.0  # seconds to open a connection before giving up
SOCKET_TIMEOUT = 5.0  # seconds any reply may take
MAX_BELL_WAIT = 2.0  # longest single BLPOP / pub/sub wait (well under SOCKET_TIMEOUT)
CLAIM_SCAN_LIMIT = 10_000  # most queue entries one claim looks at (bounds the script's run time)
MAX_LANES = 64  # owners one claim takes turns between (the next claim goes on from there)
MAINTAIN_BATCH = 1_000  # ids handled per maintenance script call
MAINTAIN_ROUNDS = 20  # most script calls per kind in one maintain(): bounds how long it holds the API's store thread


def _split_url(url: str) -> tuple[str, str]:
    """The Redis URL without our ``prefix`` query parameter, and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    rest = []
    for name, value in query:
        if name == "prefix":
            prefix = value.strip() or DEFAULT_PREFIX
        else:
            rest.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


def _webhook_state(fields: Sequence[Any]) -> Optional[WebhookState]:
    status, attempts, error = fields
    if status is None:
        return None
    return WebhookState(_text(status), int(attempts or 0), _text(error) if error else None)


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _same_time(stored: Any, at: float) -> bool:
    """Whether a job's stored finish time is ``at`` (the failures list keeps 14 digits of it)."""
    try:
        return stored is not None and abs(float(_text(stored)) - at) < 0.01
    except ValueError:
        return False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(url: str) -> tuple[redis.Redis, Keys, str]:
    """A client for the Redis the URL names, the key names under its prefix, and its address for messages."""
    connect_url, prefix = _split_url(url)
    try:
        client: redis.Redis = redis.Redis.from_url(
            connect_url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1),  # one quick retry on a fresh connection, e.g. after a Redis restart
            health_check_interval=30,
        )
    except ValueError as exc:
        raise SettingsError(f"--broker: invalid Redis URL {url!r}: {exc}") from None
    kwargs = client.connection_pool.connection_kwargs
    address = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return client, Keys(prefix), address


class RedisStore(Store):
    """Jobs in Redis, shared by every API server and prediction loop that uses the same URL and prefix."""

    backend_errors = (redis.RedisError, OSError)

    def __init__(self, url: str) -> None:
        self._redis, self.keys, self.address = connect(url)
        register = self._redis.register_script
        self._submit = register(_LUA_PRELUDE + _LUA_SUBMIT)
        self._claim = register(_LUA_PRELUDE + _LUA_CLAIM)
        self._finish = register(_LUA_PRELUDE + _LUA_FINISH)
        self._cancel = register(_LUA_PRELUDE + _LUA_CANCEL)
        self._requeue = register(_LUA_PRELUDE + _LUA_REQUEUE)
        self._heartbeat = register(_LUA_PRELUDE + _LUA_HEARTBEAT)
        self._expire = register(_LUA_PRELUDE + _LUA_EXPIRE)
        self._claim_hooks = register(_LUA_PRELUDE + _LUA_CLAIM_WEBHOOKS)
        self._retry_hook = register(_LUA_PRELUDE + _LUA_WEBHOOK_RETRY)
        self._end_hook = register(_LUA_PRELUDE + _LUA_WEBHOOK_END)
        self._unfinished = register(_LUA_PRELUDE + _LUA_UNFINISHED)
        self._depths = register(_LUA_PRELUDE + _LUA_DEPTHS)
        self._by_owner = register(_LUA_PRELUDE + _LUA_BY_OWNER)
        self._script_keys = self.keys.script_keys()
        self._prefixes = self.keys.script_prefixes()

    def _unavailable(self, operation: str, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
            return StoreUnavailable(f"cannot reach Redis at {self.address}: {exc}")
        log.warning("Redis at %s failed in %s: %s", self.address, operation, exc)
        return StoreUnavailable(f"Redis at {self.address} failed: {exc}")

    def _run(self, script: Any, *args: Any) -> Any:
        return script(keys=self._script_keys, args=[*self._prefixes, *args])

    def close(self) -> None:
        try:
            self._redis.close()
        except (redis.RedisError, OSError):  # closing a broken pool must not fail a shutdown
            pass

    # -- API side -------------------------------------------------------------
    def submit(self, jobs: Sequence[NewJob], *, block: bool = True) -> bool:
        if not block:
            return False  # every write goes over the network: never on an event loop
        if not jobs:
            return True
        args: list[Any] = [repr(time.time())]
        for job in jobs:
            deadline = "" if job.deadline is None else repr(float(job.deadline))
            args += [job.id, int(job.priority), job.payload, int(job.n_items), deadline, job.webhook or "",
                     job.origin or "", job.owner]
        taken = self._run(self._submit, *args)
        if isinstance(taken, list):  # ids the store holds (or the batch repeats): nothing was written
            raise JobExists([_text(i) for i in taken])
        return True

    def get(self, ids: Sequence[str]) -> dict[str, JobView]:
        views: dict[str, JobView] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            pipe = self._redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(self.keys.job(job_id), "status", "result", "reason", "error_status", "owner")
                pipe.hmget(self.keys.hook(job_id), "status", "attempts", "last_error")
            replies = pipe.execute()
            for job_id, (status, result, reason, error_status, owner), hook in zip(
                chunk, replies[0::2], replies[1::2]
            ):
                if status is None:
                    continue
                views[job_id] = JobView(
                    job_id,
                    JobStatus(_text(status)),
                    result,
                    None if reason is None else _text(reason),
                    int(error_status) if error_status else 500,
                    "" if owner is None else _text(owner),
                    _webhook_state(hook),
                )
        return views

    def cancel(
        self, ids: Sequence[str], reason: str, error_status: int, *, status: JobStatus = JobStatus.FAILED,
        running: bool = False,
    ) -> list[str]:
        if not ids:
            return []
        args = (repr(time.time()), reason, int(error_status), status.value, "1" if running else "0", *ids)
        return [_text(i) for i in self._run(self._cancel, *args)]

    def unfinished_by_owner(self) -> dict[str, int]:
        return {_text(owner): int(n) for owner, n in _pairs(self._run(self._by_owner))}

    def unfinished(self) -> int:
        return int(self._run(self._unfinished))

    def queue_depths(self, stages: int) -> list[int]:
        return [int(n) for n in self._run(self._depths, int(stages))]

    # -- loop side ------------------------------------------------------------
    def claim(self, stage: int, max_items: int, worker_id: str, lease_seconds: float) -> list[ClaimedJob]:
        now = time.time()
        flat = self._run(
            self._claim, stage, int(max_items), worker_id, repr(now), repr(now + lease_seconds), TIMED_OUT_REASON,
            CLAIM_SCAN_LIMIT, MAX_LANES,
        )
        claimed = []
        for i in range(0, len(flat), 4):
            job_id, payload, n_items, deadline = flat[i : i + 4]
            claimed.append(
                ClaimedJob(_text(job_id), stage, payload, int(n_items), float(deadline) if deadline else None)
            )
        return claimed

    def finish(self, outcomes: Sequence[Outcome], worker_id: str) -> None:
        if not outcomes:
            return
        args: list[Any] = [repr(time.time())]
        for out in outcomes:
            if out.payload is not None:
                args += [out.id, out.stage, "next", out.payload, int(out.n_items)]
            elif out.result is not None:
                args += [out.id, out.stage, "done", out.result, ""]
            else:
                args += [out.id, out.stage, "failed", out.reason or "failed", int(out.error_status)]
        self._run(self._finish, *args)

    # -- workers --------------------------------------------------------------
    def heartbeat(self, info: WorkerInfo, lease_seconds: float) -> None:
        document = orjson.dumps({
            "worker_id": info.worker_id, "stage": info.stage, "host": info.host, "pid": info.pid,
            "batch_size": info.batch_size, "ready": info.ready, "seen": info.seen, "stats": info.stats,
        })
        self._run(self._heartbeat, info.worker_id, document, repr(info.seen), repr(info.seen + lease_seconds))

    def workers(self) -> list[WorkerInfo]:
        found = []
        for raw in self._redis.hvals(self.keys.workers):
            try:
                d = orjson.loads(raw)
                found.append(WorkerInfo(
                    d["worker_id"], int(d["stage"]), d["host"], int(d["pid"]), int(d["batch_size"]),
                    bool(d["ready"]), float(d["seen"]), dict(d.get("stats") or {}),
                ))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                log.warning("ignoring an unreadable worker record in %s: %s", self.keys.workers, exc)
        return found

    def release_worker(self, worker_id: str) -> int:
        return max(0, int(self._release(worker_id, cutoff="")))

    def _release(self, worker_id: str, cutoff: str) -> int:
        return int(self._run(
            self._requeue, "worker", repr(time.time()), MAX_ATTEMPTS, POISON_REASON, worker_id, cutoff,
        ))

    # -- maintenance ----------------------------------------------------------
    def maintain(self, now: float, result_ttl: float, worker_timeout: float) -> None:
        self._redis.hset(self.keys.config, "result_ttl", repr(float(result_ttl)))
        cutoff = now - worker_timeout
        for raw in self._redis.zrangebyscore(self.keys.seen, "-inf", f"({cutoff!r}"):
            worker_id = _text(raw)
            if self._release(worker_id, repr(cutoff)) > 0:
                log.info("requeued the jobs of %s: no heartbeat for %.0f s", worker_id, worker_timeout)
        for _ in range(MAINTAIN_ROUNDS):
            lapsed = self._redis.zrangebyscore(self.keys.leased, "-inf", f"({now!r}", start=0, num=MAINTAIN_BATCH)
            if lapsed:
                self._run(self._requeue, "lapsed", repr(now), MAX_ATTEMPTS, POISON_REASON, *lapsed)
            if len(lapsed) < MAINTAIN_BATCH:
                break
        for _ in range(MAINTAIN_ROUNDS):  # the rest waits for the next call
            if int(self._run(self._expire, repr(now - result_ttl), MAINTAIN_BATCH)) < MAINTAIN_BATCH:
                break

    # -- webhook outbox -------------------------------------------------------
    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
        now = time.time()
        flat = self._run(self._claim_hooks, repr(now), repr(now + lease_seconds), int(limit))
        pending = [(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]
        if not pending:
            return []
        views = self.get([job_id for job_id, _, _ in pending])
        deliveries = []
        for job_id, url, attempts in pending:
            view = views.get(job_id)
            if view is None or not view.status.finished:  # the result expired: nothing left to send
                self.webhook_failed(job_id, "the job's result expired before the webhook could be delivered")
                continue
            body = result_document(job_id, view.status, view.result, view.reason)
            deliveries.append(WebhookDelivery(job_id, url, body, attempts))
        return deliveries

    def webhook_delivered(self, job_id: str) -> None:
        self._run(self._end_hook, job_id, "delivered", "")

    def webhook_retry(self, job_id: str, next_attempt_at: float, error: str = "") -> None:
        self._run(self._retry_hook, job_id, repr(float(next_attempt_at)), error)

    def webhook_failed(self, job_id: str, error: str) -> None:
        self._run(self._end_hook, job_id, "failed", error)

    # -- what an operator sees -------------------------------------------------
    def recent_failures(self, limit: int) -> list[Failure]:
        entries = []
        for raw in self._redis.lrange(self.keys.failures, 0, max(0, limit - 1)):
            try:
                at, job_id, reason, *_ = orjson.loads(raw)
                entries.append((float(at), str(job_id), str(reason)))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.warning("skipped an unreadable entry in %s", self.keys.failures)
        # each job's owner from the job itself (the entries keep the format every version reads),
        # if it is still the job that failed then: an expired job has no owner, and an id used
        # again since belongs to another job (it finished at another time, or not yet), so the
        # failure is then shown to no key
        with self._redis.pipeline(transaction=False) as pipe:
            for _, job_id, _ in entries:
                pipe.hmget(self.keys.job(job_id), "owner", "finished")
            jobs = pipe.execute()
        return [Failure(at, job_id, reason, _text(owner) if owner and _same_time(finished, at) else "")
                for (at, job_id, reason), (owner, finished) in zip(entries, jobs)]

    def outbox(self) -> Outbox:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.outbox)
            pipe.hmget(self.keys.tallies, "webhooks_delivered", "webhooks_failed")
            pending, (delivered, failed) = pipe.execute()
        return Outbox(int(pending), int(delivered or 0), int(failed or 0))

    # -- for tests and operators ------------------------------------------------
    def delete_all(self) -> int:
        """Delete every key under this store's prefix (tests, or resetting a deployment)."""
        deleted = 0
        batch: list[bytes] = []
        for key in self._redis.scan_iter(match=self.keys.pattern(), count=500):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(self._redis.delete(*batch))
                batch = []
        if batch:
            deleted += int(self._redis.delete(*batch))
        return deleted

