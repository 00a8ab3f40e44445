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

import hashlib
import logging
import math
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
from fastdeploy.errors import JobExists, OwnerLimitReached, SettingsError, StoreUnavailable
from fastdeploy.jobs import (
    MAX_JOB_ID, TIMED_OUT_REASON, Binding, ClaimedJob, JobState, JobStatus, JobView, NewJob, Outcome, WebhookState,
    WorkerInfo, is_job_id,
)
from fastdeploy.store.base import MAX_ATTEMPTS, POISON_REASON, Failure, Outbox, Resign, Store, WebhookDelivery

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
    def finished(self) -> str:  # zset: job id -> finished time, of jobs a key TTL alone does not expire
        return f"{self.prefix}:finished"

    @property
    def outbox(self) -> str:  # zset: job id -> when its webhook is due (a lease pushes it later)
        return f"{self.prefix}:webhooks"

    @property
    def stages(self) -> str:  # set: stages that have a queue (for counting unfinished jobs)
        return f"{self.prefix}:stages"

    @property
    def config(self) -> str:  # hash: result_ttl and waited_ttl, as last set by an API server's maintenance
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
    def owned(self) -> str:  # hash: owner -> its unfinished jobs (queued or processing), for the per-key bound
        return f"{self.prefix}:unfinished"

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

    @property
    def failed_prefix(self) -> str:  # list per owner: its last FAILURES_KEPT failures, as ``failures``; expires
        return f"{self.prefix}:failures:"

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

    def failed(self, owner: str) -> str:
        return self.failed_prefix + owner

    def pattern(self) -> str:
        """SCAN pattern matching every key of this prefix."""
        return f"{self.prefix}:*"

    def script_keys(self) -> list[str]:
        """KEYS[1..12] of every script, in the order _LUA_PRELUDE names them."""
        return [self.seq, self.leased, self.finished, self.outbox, self.stages, self.config, self.workers, self.seen,
                self.turns, self.failures, self.tallies, self.owned]

    def script_prefixes(self) -> list[str]:
        """ARGV[1..8] of every script, in the order _LUA_PRELUDE names them."""
        return [self.job_prefix, self.queue_prefix, self.held_prefix, self.bell_prefix, self.hook_prefix, self.results,
                self.lanes_prefix, self.failed_prefix]


# -- Lua ------------------------------------------------------------------------------
# Shared by every script: key names from KEYS/ARGV, and the steps several scripts take.
_LUA_PRELUDE = """
local K_SEQ, K_LEASED, K_FINISHED, K_OUTBOX = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_STAGES, K_CONFIG, K_WORKERS, K_SEEN, K_TURNS = KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local K_FAILURES, K_TALLIES, K_OWNED = KEYS[10], KEYS[11], KEYS[12]
local P_JOB, P_QUEUE, P_HELD, P_BELL, P_HOOK, CH_RESULTS = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local P_LANES, P_FAILED = ARGV[7], ARGV[8]
local A = 9  -- first argument of the script itself
local SCORE_SCALE = 1000000000000
local BELL_TOKENS = 16
local BELL_TTL = 60
local FAILURES_KEPT = 50
local DEFAULT_TTL = 3600  -- seconds an owner's failures list outlives its last failure before result_ttl is known
local MAX_KEEP = 10000000000  -- seconds: a longer TTL would not fit EXPIRE's integer once in milliseconds

-- Records are untrusted (anyone who can write to Redis can write them), and one error stops the whole
-- script (a batch unrecorded, a maintenance pass failed): what a record says is read so that nothing
-- it holds can raise.

-- A number from a record; fastDeploy writes only finite numbers there: anything else is `default`.
local function num(x, default)
  local n = (type(x) == 'string' or type(x) == 'number') and tonumber(x)
  if n and n == n and n > -math.huge and n < math.huge then return n end
  return default
end

-- Whether a redis.pcall reply is an error (a key of another type: not written by fastDeploy).
local function is_error(reply)
  return type(reply) == 'table' and reply.err ~= nil
end

-- Fields of a job's (or webhook's) hash; nil where its key holds another type: not a record.
local function record(key, ...)
  local f = redis.pcall('HMGET', key, ...)
  if is_error(f) then return nil end
  return f
end

-- Whether a record's stage is one fastDeploy writes: a number in its plain form, fit for key names.
local function is_stage(x)
  return type(x) == 'string' and #x < 10 and string.find(x, '^%d+$') ~= nil and tostring(tonumber(x)) == x
end

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
  return P_QUEUE .. (stage or '') .. ':' .. (owner or '')
end

-- Jobs queued in a lane; a key of another type there (not fastDeploy's) holds none.
local function lane_size(stage, owner)
  local n = redis.pcall('ZCARD', lane(stage, owner))
  return type(n) == 'number' and n or 0
end

-- The owners with jobs queued at a stage; none where its key holds another type.
local function lane_owners(stage)
  local owners = redis.pcall('ZRANGE', P_LANES .. stage, 0, -1)
  return is_error(owners) and {} or owners
end

-- Take a job out of its lane; a lane left empty leaves the stage's set of lanes. Lanes are named by
-- records (pcall: another writer's key of another type there is left alone).
local function dequeue(id, stage, owner)
  redis.pcall('ZREM', lane(stage, owner), id)
  if lane_size(stage, owner) == 0 then redis.pcall('ZREM', P_LANES .. (stage or ''), owner or '') end
end

-- ZADD to a sorted set named by a record; a key of another type there (never one of ours) is replaced,
-- so another writer's key cannot stop an owner's jobs or a stage.
local function zadd(key, score, member)
  if is_error(redis.pcall('ZADD', key, score, member)) then
    if redis.call('TYPE', key).ok ~= 'zset' then redis.call('DEL', key) end
    redis.call('ZADD', key, score, member)  -- raises what is not about the key's type
  end
end

-- Queue a job in its owner's lane; a priority or seq that is not a number queues it last of its priorities.
local function enqueue(id, stage, priority, seq, owner)
  zadd(lane(stage, owner), num(priority, 9) * SCORE_SCALE + num(seq, 0), id)
  zadd(P_LANES .. stage, 0, owner or '')
  redis.call('SADD', K_STAGES, stage)
end

local function unlease(id, worker)
  redis.call('ZREM', K_LEASED, id)
  if worker and worker ~= '' then redis.pcall('SREM', P_HELD .. worker, id) end
end

-- One more (or one less: -1) unfinished job of an owner; a count that reaches 0 leaves the hash, and
-- so does one that is not a number (not written here: the next recount puts it right).
local function count_owned(owner, step)
  local n = redis.pcall('HINCRBY', K_OWNED, owner or '', step)
  if type(n) ~= 'number' or n <= 0 then redis.call('HDEL', K_OWNED, owner or '') end
end

-- Record a failure in the list of all and in its owner's own (bounded, and gone a while after its last failure).
local function remember_failure(id, now, reason, owner, ttl)
  local entry = cjson.encode({tonumber(now), id, reason})
  local mine = P_FAILED .. (owner or '')
  redis.call('LPUSH', K_FAILURES, entry)
  redis.call('LTRIM', K_FAILURES, 0, FAILURES_KEPT - 1)
  redis.pcall('LPUSH', mine, entry)  -- pcall: named by the record; another writer's key of another type stays
  redis.pcall('LTRIM', mine, 0, FAILURES_KEPT - 1)
  redis.pcall('EXPIRE', mine, math.max(1, math.ceil(ttl or DEFAULT_TTL)))
end

-- End a job for good (done or failed): drop its inputs, index it for expiry, queue its webhook.
local function finalize(id, now, fields)
  local jk = P_JOB .. id
  local f = redis.call('HMGET', jk, 'stage', 'status', 'worker', 'webhook', 'owner', 'origin')
  if f[2] == 'queued' then dequeue(id, f[1], f[5]) end
  if f[2] == 'queued' or f[2] == 'processing' then count_owned(f[5], -1) end  -- once: it ends here
  unlease(id, f[3])
  -- what only a queued or running job needs goes with its inputs: the hash keeps status, outcome, owner, times
  redis.call('HDEL', jk, 'payload', 'lease_until', 'deadline', 'origin', 'webhook', 'priority', 'seq', 'n_items',
    'attempts', 'created')
  redis.call('HSET', jk, 'worker', '', 'finished', now, unpack(fields))
  local config = redis.call('HMGET', K_CONFIG, 'result_ttl', 'waited_ttl')
  local ttl = num(config[1], nil)
  if ttl then ttl = math.min(ttl, MAX_KEEP) end
  if fields[2] == 'failed' then remember_failure(id, now, fields[4], f[5], ttl) end
  local keep = ttl  -- a result its caller waited for (/sync: it had an origin) goes sooner; a failure does not
  if ttl and f[6] and f[6] ~= '' and fields[2] == 'done' then keep = math.min(ttl, num(config[2], ttl)) end
  if keep then redis.call('PEXPIRE', jk, math.floor(keep * 1000)) end
  -- the expiry index, only for what the key's own TTL does not remove: a webhook's record, or a job that
  -- ended before an API server said how long results are kept
  if not keep or (f[4] and f[4] ~= '') then redis.call('ZADD', K_FINISHED, now, id) end
  if f[4] and f[4] ~= '' then
    redis.pcall('HSET', P_HOOK .. id, 'url', f[4], 'attempts', 0, 'status', 'pending', 'last_at', '')
    redis.call('ZADD', K_OUTBOX, now, id)
  end
end

-- Put a leased job back in the queue, or fail it once it has cost MAX_ATTEMPTS loops (or at once, as
-- malformed, when its record has no stage fastDeploy writes: there is no queue to put it back in).
local function requeue(id, now, max_attempts, poison, malformed, failed, rings)
  local jk = P_JOB .. id
  local f = redis.call('HMGET', jk, 'stage', 'worker', 'attempts', 'priority', 'seq', 'owner')
  local attempts = math.max(0, math.floor(num(f[3], 0))) + 1
  if not is_stage(f[1]) then
    finalize(id, now, {'status', 'failed', 'reason', malformed, 'error_status', '500'})
    failed[#failed + 1] = id
  elseif attempts >= max_attempts then
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

# ARGV[A..]: now, owner limit (0: none), then (id, priority, payload, n_items, deadline, webhook, origin, owner)
# per job; origin: the API server whose /sync request waits for the job ('' when none does).
# Returns the count, or (writing nothing) {'exists', ids already held or repeated} (the caller's JobExists),
# or {'full', ids that would take their owner past the limit} (the caller's OwnerLimitReached).
_LUA_SUBMIT = """
local now, limit = ARGV[A], tonumber(ARGV[A + 1])
local count = (#ARGV - A - 1) / 8
local taken, seen = {'exists'}, {}
for i = A + 2, #ARGV, 8 do
  local id = ARGV[i]
  if seen[id] or redis.call('EXISTS', P_JOB .. id) == 1 then taken[#taken + 1] = id end
  seen[id] = true
end
if #taken > 1 then return taken end
if limit > 0 then
  local over, owned = {'full'}, {}
  for i = A + 2, #ARGV, 8 do
    local owner = ARGV[i + 7]
    owned[owner] = (owned[owner] or num(redis.call('HGET', K_OWNED, owner), 0)) + 1
    if owned[owner] > limit then over[#over + 1] = ARGV[i] end
  end
  if #over > 1 then return over end
end
local last = redis.call('INCRBY', K_SEQ, count)
local seq = last - count
for i = A + 2, #ARGV, 8 do
  seq = seq + 1
  local id = ARGV[i]
  redis.call('HSET', P_JOB .. id, 'stage', '0', 'status', 'queued', 'priority', ARGV[i + 1], 'seq', seq,
    'payload', ARGV[i + 2], 'n_items', ARGV[i + 3], 'deadline', ARGV[i + 4], 'webhook', ARGV[i + 5],
    'origin', ARGV[i + 6], 'owner', ARGV[i + 7], 'attempts', '0', 'created', now)
  enqueue(id, '0', ARGV[i + 1], seq, ARGV[i + 7])
  count_owned(ARGV[i + 7], 1)
end
ring_jobs('0')
return count
"""

# ARGV[A..]: stage, max_items, worker, now, lease_until, timed-out reason, scan limit, max lanes, malformed reason,
# longest id
# Returns (id, payload, n_items, deadline, owner) per claimed job, flattened. A record with no payload,
# an id outside the id grammar (jobs.is_job_id), or an item count or deadline that is not a number, fails at once: nothing but this script reads it.
# Fair share (as fastdeploy/store/fairness.py): one job per lane (owner) per round, the lanes
# in name order starting after the one the last claim ended with; within a lane, priority then arrival.
_LUA_CLAIM = """
local stage, max_items, worker = ARGV[A], tonumber(ARGV[A + 1]), ARGV[A + 2]
local now, lease_until, reason, scan_limit = ARGV[A + 3], ARGV[A + 4], ARGV[A + 5], tonumber(ARGV[A + 6])
local max_lanes = tonumber(ARGV[A + 7])
local MAX_ITEMS, MALFORMED, MAX_ID = 2147483647, ARGV[A + 8], tonumber(ARGV[A + 9])
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
    local ids = redis.pcall('ZRANGE', queue, 0, 0)
    if is_error(ids) or #ids == 0 then  -- empty, or another writer's key of another type: no lane
      redis.call('ZREM', lanes_key, owner)
      return nil
    end
    local id = ids[1]
    scanned = scanned + 1
    local f = record(P_JOB .. id, 'status', 'stage', 'n_items', 'deadline', 'payload') or {}
    local n, deadline = num(f[3], nil), false
    if f[4] and f[4] ~= '' then deadline = num(f[4], nil) end  -- nil: not a number
    if f[1] ~= 'queued' or f[2] ~= stage then
      redis.call('ZREM', queue, id)  -- stale index entry (expired, moved on, or not a job's hash)
    elseif #id > MAX_ID or not string.find(id, '^[%w%._:%-]+$') or not n or n < 1 or n > MAX_ITEMS
        or n ~= math.floor(n) or deadline == nil or not f[5] then
      -- not a record fastDeploy wrote (someone else wrote into Redis): it fails alone, nothing reads it
      finalize(id, now, {'status', 'failed', 'reason', MALFORMED, 'error_status', '500'})
      timed_out[#timed_out + 1] = id
    elseif deadline and deadline < nnow then
      finalize(id, now, {'status', 'failed', 'reason', reason, 'error_status', '504'})
      timed_out[#timed_out + 1] = id
    else
      f[3] = string.format('%d', n)
      if deadline then f[4] = string.format('%.17g', deadline) end
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
      out[#out + 1] = owner
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

# ARGV[A..]: now, worker, then (id, stage, kind, data, extra) per outcome; returns the ids no other worker holds
# at that stage (whose inputs there, uploaded files, may be deleted);
# kind 'next' (data = payload, extra = n_items), 'done' (data = result), 'failed' (data = reason, extra = status)
_LUA_FINISH = """
local now, worker = ARGV[A], ARGV[A + 1]
local finished, rings, carried, free = {}, {}, {}, {}
local function tell(origin, id, entry)
  if origin and origin ~= '' then  -- straight to the API server that waits, outcome included
    carried[origin] = carried[origin] or {}
    table.insert(carried[origin], entry)
  else
    finished[#finished + 1] = id
  end
end
for i = A + 2, #ARGV, 5 do
  local id, stage, kind, data, extra = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local jk = P_JOB .. id
  local f = record(jk, 'status', 'stage', 'worker', 'priority', 'seq', 'origin', 'owner') or {}  -- {}: not a job
  if not (f[1] == 'processing' and f[2] == stage and f[3] and f[3] ~= '' and f[3] ~= worker) then
    free[#free + 1] = id  -- no other loop holds it at this stage: its inputs there may go
  end
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
return free
"""

# ARGV[A..]: now, reason, error status, status, running ('1': jobs being predicted too), then the ids
_LUA_CANCEL = """
local now, reason, error_status, status, running = ARGV[A], ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4]
local cancelled = {}
for i = A + 5, #ARGV do
  local id = ARGV[i]
  local current = redis.pcall('HGET', P_JOB .. id, 'status')  -- an error reply (not a job's hash) is neither
  if current == 'queued' or (running == '1' and current == 'processing') then
    finalize(id, now, {'status', status, 'reason', reason, 'error_status', error_status})
    cancelled[#cancelled + 1] = id
  end
end
ring_results(cancelled)
return cancelled
"""

# ARGV[A..]: mode, now, max_attempts, poison reason template, malformed reason, then
#   mode 'worker': worker id, seen cutoff ('' = release unconditionally)
#   mode 'lapsed': job ids whose lease may have run out
# Returns how many jobs were taken back (requeued, or failed as poison or malformed).
_LUA_REQUEUE = """
local mode, now, max_attempts, poison = ARGV[A], ARGV[A + 1], tonumber(ARGV[A + 2]), ARGV[A + 3]
local malformed = ARGV[A + 4]
local nnow = tonumber(now)
local failed, rings = {}, {}
local count = 0
if mode == 'worker' then
  local worker, cutoff = ARGV[A + 5], ARGV[A + 6]
  if cutoff ~= '' then
    local seen = redis.call('ZSCORE', K_SEEN, worker)
    if seen and tonumber(seen) >= tonumber(cutoff) then return -1 end  -- it heartbeated meanwhile
  end
  redis.call('HDEL', K_WORKERS, worker)
  redis.call('ZREM', K_SEEN, worker)
  local held = P_HELD .. worker
  for _, id in ipairs(redis.call('SMEMBERS', held)) do
    local f = record(P_JOB .. id, 'status', 'worker') or {}
    if f[1] == 'processing' and f[2] == worker then
      requeue(id, now, max_attempts, poison, malformed, failed, rings)
      count = count + 1
    end
  end
  redis.call('DEL', held)
else
  for i = A + 5, #ARGV do
    local id = ARGV[i]
    local f = record(P_JOB .. id, 'status', 'lease_until') or {}
    if f[1] ~= 'processing' then
      redis.call('ZREM', K_LEASED, id)  -- stale index entry (or not a job's hash)
    elseif num(f[2], 0) < nnow then  -- a lease that is not a number has run out
      requeue(id, now, max_attempts, poison, malformed, failed, rings)
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
  local f = record(jk, 'status', 'worker') or {}
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

# ARGV[A..]: now, lease_until, limit, longest id. Returns (id, url, attempts) per leased delivery, flattened;
# an entry with an id outside the id grammar or a non-numeric attempt count is dropped.
_LUA_CLAIM_WEBHOOKS = """
local ids = redis.call('ZRANGEBYSCORE', K_OUTBOX, '-inf', ARGV[A], 'LIMIT', 0, tonumber(ARGV[A + 2]))
local out = {}
for _, id in ipairs(ids) do
  local f = record(P_HOOK .. id, 'url', 'attempts')
  local attempts = f and num(f[2] or '0', nil)
  if not f or (f[1] and (#id > tonumber(ARGV[A + 3]) or not string.find(id, '^[%w%._:%-]+$') or not attempts
               or attempts ~= math.floor(attempts) or attempts < 0 or attempts > 1000000)) then
    -- not written by fastDeploy (or its key holds another type): dropped before its id becomes a log
    -- field or its URL is read
    redis.call('ZREM', K_OUTBOX, id)
    redis.call('DEL', P_HOOK .. id)
  elseif f[1] then
    f[2] = string.format('%d', attempts)
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

# ARGV[A..]: job id, next attempt time, now
_LUA_WEBHOOK_RETRY = """
local id = ARGV[A]
local f = record(P_HOOK .. id, 'status', 'attempts') or {}
if f[1] == 'pending' then
  redis.call('HSET', P_HOOK .. id, 'attempts', num(f[2], 0) + 1, 'last_at', ARGV[A + 2])
  redis.call('ZADD', K_OUTBOX, ARGV[A + 1], id)
end
return 1
"""

# ARGV[A..]: job id, final status (delivered or failed), now. Takes the webhook out of the outbox for good.
_LUA_WEBHOOK_END = """
local id = ARGV[A]
redis.call('ZREM', K_OUTBOX, id)
local f = record(P_HOOK .. id, 'status', 'attempts') or {}
if f[1] == 'pending' then
  redis.pcall('HINCRBY', K_TALLIES, 'webhooks_' .. ARGV[A + 1], 1)  -- a tally that is not a number stays as it is
  redis.call('HSET', P_HOOK .. id, 'status', ARGV[A + 1], 'attempts', num(f[2], 0) + 1, 'last_at', ARGV[A + 2])
end
return 1
"""

# Returns the number of jobs queued (any stage) or leased.
_LUA_UNFINISHED = """
local total = redis.call('ZCARD', K_LEASED)
for _, stage in ipairs(redis.call('SMEMBERS', K_STAGES)) do
  for _, owner in ipairs(lane_owners(stage)) do total = total + lane_size(stage, owner) end
end
return total
"""

# ARGV[A..]: phase, cursor, owners to look at, most leased jobs to read. Puts right the per-owner counts
# the submit script checks the per-key bound against (kept in step job by job) for about that many owners,
# going on where the last call stopped; over the calls every owner is looked at: those with a count
# (phase 0, HSCAN), those with jobs queued at each stage (phases 1..#stages, the lanes in name order),
# those with jobs leased (the last phase). So whatever went astray (jobs an earlier version wrote, keys
# deleted or evicted by hand) heals, at a bounded cost per call however many owners there are. An owner
# is recounted whole in one call (its lanes and leases), so its count is exact; while more jobs are leased
# than may be read, a count is only moved into the range its lanes and the number leased allow.
# Returns {phase, cursor} for the next call.
_LUA_RECOUNT = """
local phase, cursor, budget, leased_max = tonumber(ARGV[A]), ARGV[A + 1], tonumber(ARGV[A + 2]), tonumber(ARGV[A + 3])
local stages = redis.call('SMEMBERS', K_STAGES)
table.sort(stages)
local n_leased = redis.call('ZCARD', K_LEASED)
local leased = nil

-- owner -> its leased jobs, read once per call; nil while too many are leased to read them all
local function leased_by_owner()
  if n_leased > leased_max then return nil end
  if not leased then
    leased = {}
    for _, id in ipairs(redis.call('ZRANGE', K_LEASED, 0, -1)) do
      local owner = redis.pcall('HGET', P_JOB .. id, 'owner')
      if type(owner) == 'string' then leased[owner] = (leased[owner] or 0) + 1 end
    end
  end
  return leased
end

local function put_right(owner)
  local queued = 0
  for _, stage in ipairs(stages) do queued = queued + lane_size(stage, owner) end
  local raw = redis.call('HGET', K_OWNED, owner)
  local have = num(raw, nil)
  local by_owner = leased_by_owner()
  local want
  if by_owner then want = queued + (by_owner[owner] or 0)
  else want = math.max(queued, math.min(math.floor(have or 0), queued + n_leased)) end
  if want > 0 and want ~= have then redis.call('HSET', K_OWNED, owner, want)
  elseif want <= 0 and raw then redis.call('HDEL', K_OWNED, owner) end
end

local looked = 0
while looked < budget do
  local owners, next_phase, next_cursor = {}, phase, cursor
  if phase == 0 then
    local reply = redis.call('HSCAN', K_OWNED, cursor, 'COUNT', budget - looked)
    for i = 1, #reply[2], 2 do owners[#owners + 1] = reply[2][i] end
    if reply[1] == '0' then next_phase, next_cursor = 1, '-' else next_cursor = reply[1] end
  elseif phase <= #stages then
    local reply = redis.pcall('ZRANGEBYLEX', P_LANES .. stages[phase], cursor, '+', 'LIMIT', 0, budget - looked)
    if not is_error(reply) then owners = reply end
    if #owners < budget - looked then next_phase, next_cursor = phase + 1, '-'
    else next_cursor = '(' .. owners[#owners] end
  else
    for owner, _ in pairs(leased_by_owner() or {}) do owners[#owners + 1] = owner end
    next_phase, next_cursor = 0, '0'
  end
  for _, owner in ipairs(owners) do put_right(owner) end
  looked = looked + #owners + 1  -- a step that found nobody counts too: every call ends
  phase, cursor = next_phase, next_cursor
  if phase == 0 and cursor == '0' then break end  -- back at the start: one round at most per call
end
return {phase, cursor}
"""

# ARGV[A..]: number of stages. Returns the jobs queued at each stage (every lane).
# ARGV[A..]: batch. Moves up to that many jobs from the per-stage queues of versions before fair share
# (one zset per stage, PREFIX:queue:STAGE) into their owners' lanes, score kept; returns how many moved.
_LUA_UPGRADE = """
local batch, moved = tonumber(ARGV[A]), 0
for _, stage in ipairs(redis.call('SMEMBERS', K_STAGES)) do
  local old = P_QUEUE .. stage
  if moved < batch and redis.call('TYPE', old).ok == 'zset' then
    local entries = redis.call('ZRANGE', old, 0, batch - moved - 1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      local id = entries[i]
      local owner = redis.pcall('HGET', P_JOB .. id, 'owner')
      if type(owner) ~= 'string' then owner = '' end  -- none, or not a job's hash (its claim drops it)
      zadd(lane(stage, owner), entries[i + 1], id)
      zadd(P_LANES .. stage, 0, owner)
      redis.call('ZREM', old, id)
      moved = moved + 1
    end
    if #entries > 0 then ring_jobs(stage) end
  end
end
return moved
"""

# ARGV[A..]: job id, SHA-1 of the payload read, the payload to write. Writes it only if the job's
# payload is still the one read (nothing claimed and moved it on meanwhile); returns 1 when written.
_LUA_SET_PAYLOAD = """
local jk = P_JOB .. ARGV[A]
local current = redis.call('HGET', jk, 'payload')
if current and redis.sha1hex(current) == ARGV[A + 1] then
  redis.call('HSET', jk, 'payload', ARGV[A + 2])
  return 1
end
return 0
"""

# ARGV[A..]: owner, then ids. Per id: its view's fields and its webhook's (status, result, reason,
# error_status, owner, hook status, attempts, last_at) when it exists and is that owner's; else false.
_LUA_GET_OWNED = """
local out = {}
for i = A + 1, #ARGV do
  local id = ARGV[i]
  local job = record(P_JOB .. id, 'owner')  -- nil: a key of another type, nobody's job
  if job and (job[1] == ARGV[A] or (not job[1] and ARGV[A] == '')) then
    local f = redis.call('HMGET', P_JOB .. id, 'status', 'result', 'reason', 'error_status', 'owner')
    local h = record(P_HOOK .. id, 'status', 'attempts', 'last_at') or {false, false, false}
    out[#out + 1] = f[1] and {f[1], f[2], f[3], f[4], f[5], h[1], h[2], h[3]} or false
  else
    out[#out + 1] = false
  end
end
return out
"""

_LUA_DEPTHS = """
local depths = {}
for stage = 0, tonumber(ARGV[A]) - 1 do
  local total = 0
  for _, owner in ipairs(lane_owners(stage)) do total = total + lane_size(stage, owner) end
  depths[#depths + 1] = total
end
return depths
"""

# -- tuning -----------------------------------------------------------------------------
CONNECT_TIMEOUT = 2.0  # seconds to open a connection before giving up
SOCKET_TIMEOUT = 5.0  # seconds any reply may take
MAX_BELL_WAIT = 2.0  # longest single BLPOP / pub/sub wait (well under SOCKET_TIMEOUT)
MALFORMED_REASON = "the job's record in Redis is malformed (it was not written by fastDeploy)"
_SIGNED_MARK = "signed_records"  # config field: the payloads of earlier versions were signed for their jobs
CLAIM_SCAN_LIMIT = 10_000  # most queue entries one claim looks at (bounds the script's run time)
MAX_LANES = 64  # owners one claim takes turns between (the next claim goes on from there)
MAINTAIN_BATCH = 1_000  # ids handled per maintenance script call
MAINTAIN_ROUNDS = 20  # most script calls per kind in one maintain(): bounds how long it holds the API's store thread
RECOUNT_BATCH = 128  # owners whose per-key counts one maintain() recounts (each one read per stage)
RECOUNT_LEASED = 1_000  # most leased jobs a recount reads the owner of (beyond: counts are only kept in range)


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
    status, attempts, last_at = fields
    if status is None:
        return None
    return WebhookState(_text(status), int(attempts or 0), _time(last_at))


def _time(raw: Any) -> Optional[float]:
    """A Unix time the store holds, or None when it holds none (or something else: Redis is untrusted)."""
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _view(job_id: str, status: bytes, result: Optional[bytes], reason: Optional[bytes], error_status: Optional[bytes],
          owner: Optional[bytes], hook: Sequence[Any]) -> JobView:
    """A job hash as /result shows it; a hash that fastDeploy did not write (someone else wrote into
    Redis) shows as failed with that reason, never as an error of the reader."""
    try:
        return JobView(job_id, JobStatus(_text(status)), result, None if reason is None else _text(reason),
                       int(error_status) if error_status else 500, "" if owner is None else _text(owner),
                       _webhook_state(hook))
    except ValueError:  # UnicodeDecodeError included
        return JobView(job_id, JobStatus.FAILED, None, MALFORMED_REASON, 500,
                       "" if owner is None else owner.decode("utf-8", "replace"))


def _state(status: bytes, owner: Optional[bytes]) -> JobState:
    """A job hash's status and owner; one fastDeploy did not write reads as failed, as in ``_view``."""
    owner_text = "" if owner is None else owner.decode("utf-8", "replace")
    try:
        return JobState(JobStatus(status.decode()), owner_text)
    except ValueError:  # UnicodeDecodeError included
        return JobState(JobStatus.FAILED, owner_text)


def _fields(reply: Any, count: int) -> list[Any]:
    """An HMGET reply of a pipeline run with ``raise_on_error=False``: a key of another type (not a record
    fastDeploy wrote; anyone who can write to Redis may put one there) reads as no record; any other
    error is raised."""
    if isinstance(reply, redis.ResponseError):
        if not str(reply).startswith("WRONGTYPE"):
            raise reply
        return [None] * count
    return list(reply)


def _count(raw: Any) -> int:
    """A counter the store keeps; 0 for a value that is not a whole number (not written by fastDeploy)."""
    try:
        return max(0, int(raw or 0))
    except ValueError:
        return 0


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
        self._recount = register(_LUA_PRELUDE + _LUA_RECOUNT)
        self._upgrade = register(_LUA_PRELUDE + _LUA_UPGRADE)
        self._set_payload = register(_LUA_PRELUDE + _LUA_SET_PAYLOAD)
        self._get_owned = register(_LUA_PRELUDE + _LUA_GET_OWNED)
        self._script_keys = self.keys.script_keys()
        self._prefixes = self.keys.script_prefixes()
        self._recount_at: tuple[int, bytes] = (0, b"0")  # where the next recount step goes on (phase, cursor)

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
    def submit(self, jobs: Sequence[NewJob], *, block: bool = True, owner_limit: int = 0) -> bool:
        if not block:
            return False  # every write goes over the network: never on an event loop
        if not jobs:
            return True
        args: list[Any] = [repr(time.time()), max(0, int(owner_limit))]
        for job in jobs:
            deadline = "" if job.deadline is None else repr(float(job.deadline))
            args += [job.id, int(job.priority), job.payload, int(job.n_items), deadline, job.webhook or "",
                     job.origin or "", job.owner]
        refused = self._run(self._submit, *args)
        if isinstance(refused, list):  # nothing was written
            kind, ids = _text(refused[0]), [_text(i) for i in refused[1:]]
            if kind == "full":  # ids that would take their owner past the bound
                raise OwnerLimitReached(ids, int(owner_limit))
            raise JobExists(ids)  # ids the store holds (or the batch repeats)
        return True

    def get(self, ids: Sequence[str], owner: Optional[str] = None) -> dict[str, JobView]:
        if owner is not None:  # the owner is checked in Redis: another owner's result never travels here
            return self._owned_views(ids, owner)
        views: dict[str, JobView] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            pipe = self._redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(self.keys.job(job_id), "status", "result", "reason", "error_status", "owner")
                pipe.hmget(self.keys.hook(job_id), "status", "attempts", "last_at")
            replies = pipe.execute(raise_on_error=False)
            for job_id, job, hook in zip(chunk, replies[0::2], replies[1::2]):
                status, result, reason, error_status, whose = _fields(job, 5)
                if status is not None:
                    views[job_id] = _view(job_id, status, result, reason, error_status, whose, _fields(hook, 3))
        return views

    def _owned_views(self, ids: Sequence[str], owner: str) -> dict[str, JobView]:
        views: dict[str, JobView] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            replies = self._run(self._get_owned, owner, *chunk)
            for job_id, reply in zip(chunk, replies):
                if reply:
                    f: list[Any] = list(reply)
                    views[job_id] = _view(job_id, f[0], f[1], f[2], f[3], f[4], f[5:8])
        return views

    def states(self, ids: Sequence[str]) -> dict[str, JobState]:
        states: dict[str, JobState] = {}
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            pipe = self._redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(self.keys.job(job_id), "status", "owner")
            for job_id, job in zip(chunk, pipe.execute(raise_on_error=False)):
                status, owner = _fields(job, 2)
                if status is not None:
                    states[job_id] = _state(status, owner)
        return states

    def cancel(
        self, ids: Sequence[str], reason: str, error_status: int, *, status: JobStatus = JobStatus.FAILED,
        running: bool = False,
    ) -> list[str]:
        if not ids:
            return []
        args = (repr(time.time()), reason, int(error_status), status.value, "1" if running else "0", *ids)
        return [_text(i) for i in self._run(self._cancel, *args)]

    def unfinished_by_owner(self) -> dict[str, int]:
        """The counts the submit script keeps per owner: one read, however many lanes (counting the lanes
        and leases here cost a command per lane and per leased job, twice a second per API server)."""
        counts: dict[bytes, bytes] = self._redis.hgetall(self.keys.owned)  # type: ignore[assignment]
        return {owner.decode("utf-8", "replace"): _count(n) for owner, n in counts.items() if _count(n) > 0}

    def unfinished(self) -> int:
        return int(self._run(self._unfinished))

    def queue_depths(self, stages: int) -> list[int]:
        return [int(n) for n in self._run(self._depths, int(stages))]

    # -- loop side ------------------------------------------------------------
    def claim(self, stage: int, max_items: int, worker_id: str, lease_seconds: float) -> list[ClaimedJob]:
        now = time.time()
        flat = self._run(
            self._claim, stage, int(max_items), worker_id, repr(now), repr(now + lease_seconds), TIMED_OUT_REASON,
            CLAIM_SCAN_LIMIT, MAX_LANES, MALFORMED_REASON, MAX_JOB_ID,
        )
        claimed = []
        for i in range(0, len(flat), 5):
            job_id, payload, n_items, deadline, owner = flat[i : i + 5]
            claimed.append(ClaimedJob(
                _text(job_id), stage, payload, int(n_items), float(deadline) if deadline else None, _text(owner)))
        return claimed

    def finish(self, outcomes: Sequence[Outcome], worker_id: str) -> list[str]:
        if not outcomes:
            return []
        args: list[Any] = [repr(time.time()), worker_id]
        for out in outcomes:
            if out.payload is not None:
                args += [out.id, out.stage, "next", out.payload, int(out.n_items)]
            elif out.result is not None:
                args += [out.id, out.stage, "done", out.result, ""]
            else:
                args += [out.id, out.stage, "failed", out.reason or "failed", int(out.error_status)]
        return [_text(job_id) for job_id in self._run(self._finish, *args)]

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
            self._requeue, "worker", repr(time.time()), MAX_ATTEMPTS, POISON_REASON, MALFORMED_REASON, worker_id, cutoff,
        ))

    # -- maintenance ----------------------------------------------------------
    def maintain(
        self, now: float, result_ttl: float, worker_timeout: float, waited_ttl: Optional[float] = None,
    ) -> None:
        waited = result_ttl if waited_ttl is None else min(waited_ttl, result_ttl)
        self._redis.hset(self.keys.config, mapping={"result_ttl": repr(float(result_ttl)),
                                                    "waited_ttl": repr(float(waited))})
        cutoff = now - worker_timeout
        for raw in self._redis.zrangebyscore(self.keys.seen, "-inf", f"({cutoff!r}"):
            worker_id = _text(raw)
            if self._release(worker_id, repr(cutoff)) > 0:
                log.info("requeued the jobs of %s: no heartbeat for %.0f s", worker_id, worker_timeout)
        for _ in range(MAINTAIN_ROUNDS):
            lapsed = self._redis.zrangebyscore(self.keys.leased, "-inf", f"({now!r}", start=0, num=MAINTAIN_BATCH)
            if lapsed:
                self._run(self._requeue, "lapsed", repr(now), MAX_ATTEMPTS, POISON_REASON, MALFORMED_REASON, *lapsed)
            if len(lapsed) < MAINTAIN_BATCH:
                break
        for _ in range(MAINTAIN_ROUNDS):  # the rest waits for the next call
            if int(self._run(self._expire, repr(now - result_ttl), MAINTAIN_BATCH)) < MAINTAIN_BATCH:
                break
        self._recount_step()

    def _recount_step(self) -> None:
        """Put right the per-owner counts of the next RECOUNT_BATCH owners or so (the script's comment says
        how): bounded work per call however many owners there are; every owner's turn comes round."""
        phase, cursor = self._recount_at
        reply = self._run(self._recount, phase, cursor, RECOUNT_BATCH, RECOUNT_LEASED)
        self._recount_at = (int(reply[0]), bytes(reply[1]))

    # -- webhook outbox -------------------------------------------------------
    def upgrade(self, resign: Optional[Resign] = None) -> int:
        """Queue again, in their owners' lanes, the jobs an earlier version queued per stage (a Redis
        upgraded under queued jobs), then sign the payloads of unfinished jobs the way this version
        checks them (``resign``; once per Redis: a mark in the config hash says it is done). Safe
        from many processes at once: each job moves once, and a payload is rewritten only if unchanged."""
        moved = 0
        while count := int(self._run(self._upgrade, MAINTAIN_BATCH)):
            moved += count
        if moved:
            log.info("queued %d job(s) left in the queues of an earlier fastDeploy version", moved)
        signed = 0
        if resign is not None and self._redis.hget(self.keys.config, _SIGNED_MARK) is None:
            signed = self._resign(resign)
            self._redis.hset(self.keys.config, _SIGNED_MARK, "1")
            if signed:
                log.info("signed %d queued job(s) of an earlier fastDeploy version for their jobs", signed)
        return moved + signed

    def _unfinished_ids(self) -> list[str]:
        """Ids of every job queued (in any lane of any stage) or leased."""
        raw: list[Any] = list(self._redis.zrange(self.keys.leased, 0, -1))
        stages: Any = self._redis.smembers(self.keys.stages)
        for stage in stages:
            lanes: Any = self._redis.zrange(self.keys.lanes_prefix.encode() + stage, 0, -1)
            for owner in lanes:
                raw += self._redis.zrange(self.keys.queue_prefix.encode() + stage + b":" + owner, 0, -1)
        ids = {bytes(value).decode("utf-8", "replace") for value in raw}
        return sorted(job_id for job_id in ids if is_job_id(job_id))

    def _resign(self, resign: Resign) -> int:
        changed = 0
        ids = self._unfinished_ids()
        for start in range(0, len(ids), 200):
            chunk = ids[start : start + 200]
            pipe = self._redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(self.keys.job(job_id), "status", "stage", "owner", "n_items", "payload")
            for job_id, job in zip(chunk, pipe.execute(raise_on_error=False)):
                status, stage, owner, n_items, payload = _fields(job, 5)
                if status not in (b"queued", b"processing") or not payload:
                    continue
                try:
                    binding = Binding(job_id, int(stage), (owner or b"").decode(), int(n_items))
                except (TypeError, ValueError):  # not a record fastDeploy wrote: its claim fails it
                    continue
                new = resign(payload, binding)
                if new is not None and self._run(self._set_payload, job_id, hashlib.sha1(payload).hexdigest(), new):
                    changed += 1
        return changed

    def claim_webhooks(self, limit: int, lease_seconds: float) -> list[WebhookDelivery]:
        now = time.time()
        flat = self._run(self._claim_hooks, repr(now), repr(now + lease_seconds), int(limit), MAX_JOB_ID)
        pending = [(_text(flat[i]), flat[i + 1].decode("utf-8", "replace"), int(flat[i + 2])) for i in range(0, len(flat), 3)]
        if not pending:
            return []
        views = self.get([job_id for job_id, _, _ in pending])
        deliveries = []
        for job_id, url, attempts in pending:
            view = views.get(job_id)
            if view is None or not view.status.finished:  # the result expired: nothing left to send
                log.info("webhook for %s given up: the job's result expired before it could be delivered", job_id)
                self.webhook_failed(job_id)
                continue
            body = result_document(job_id, view.status, view.result, view.reason)
            deliveries.append(WebhookDelivery(job_id, url, body, attempts))
        return deliveries

    def webhook_delivered(self, job_id: str) -> None:
        self._run(self._end_hook, job_id, "delivered", repr(time.time()))

    def webhook_retry(self, job_id: str, next_attempt_at: float) -> None:
        self._run(self._retry_hook, job_id, repr(float(next_attempt_at)), repr(time.time()))

    def webhook_failed(self, job_id: str) -> None:
        self._run(self._end_hook, job_id, "failed", repr(time.time()))

    # -- what an operator sees -------------------------------------------------
    def recent_failures(self, limit: int, owner: Optional[str] = None) -> list[Failure]:
        if owner is not None:  # the owner's own list: entries are its by where they are
            return [Failure(at, job_id, reason, owner)
                    for at, job_id, reason in self._failure_entries(self.keys.failed(owner), limit)]
        entries = self._failure_entries(self.keys.failures, limit)
        # each job's owner from the job itself (the entries keep the format every version reads),
        # if it is still the job that failed then: an expired job has no owner, and an id used
        # again since belongs to another job (it finished at another time, or not yet), so the
        # failure is then shown to no key
        with self._redis.pipeline(transaction=False) as pipe:
            for _, job_id, _ in entries:
                pipe.hmget(self.keys.job(job_id), "owner", "finished")
            jobs = [_fields(job, 2) for job in pipe.execute(raise_on_error=False)]
        return [Failure(at, job_id, reason,
                        owner.decode("utf-8", "replace") if owner and _same_time(finished, at) else "")
                for (at, job_id, reason), (owner, finished) in zip(entries, jobs)]

    def _failure_entries(self, key: str, limit: int) -> list[tuple[float, str, str]]:
        """The newest ``limit`` entries of a failures list; an unreadable one is skipped."""
        entries = []
        for raw in self._redis.lrange(key, 0, max(0, limit - 1)):
            try:
                at, job_id, reason, *_ = orjson.loads(raw)
                entries.append((float(at), str(job_id), str(reason)))
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.warning("skipped an unreadable entry in %s", key)
        return entries

    def outbox(self) -> Outbox:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.outbox)
            pipe.hmget(self.keys.tallies, "webhooks_delivered", "webhooks_failed")
            pending, (delivered, failed) = pipe.execute()
        return Outbox(int(pending), _count(delivered), _count(failed))

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

