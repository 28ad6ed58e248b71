"""The job record and its state machine in Redis: what the API and the worker share.

The job record (a hash) is the source of truth; Celery only carries `(job_id, attempt)`.
Every state change is one Lua script, so it is atomic and fenced by the attempt number.

States::

    queued ──begin──> running ──finish──> succeeded | failed | cancelled
      │                 │  └──cancel──> cancelling ──finish/reap──> cancelled
      │                 └──reap (lease expired)──> queued (attempt + 1)  or  failed (budget spent)
      └──cancel──> cancelled

`JobStore` (sync redis-py) is what the worker uses; `AsyncJobStore` (redis.asyncio) is what the
API uses. Both take the same `Keys`. The scripts compute the per-owner, per-state index key
names from a prefix (so this expects a single Redis, not a cluster).

Event stream entries have the fields ``t`` (type), ``a`` (attempt), ``s`` (step) and ``e``
(the event as JSON: ``{"type", "attempt", "step", "time", "data"}``); the entry id is the SSE
event id. The metrics history is a sorted set of the same JSON strings (score = step).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.keys import Keys

__all__ = [
    "ACTIVE_STATES",
    "STATES",
    "TERMINAL_STATES",
    "AsyncJobStore",
    "JobStore",
    "Lease",
    "decode_record",
    "make_event",
    "new_job_id",
]

STATES = ("queued", "running", "succeeded", "failed", "cancelling", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATES = frozenset({"running", "cancelling"})

#: record fields holding JSON
_JSON_FIELDS = ("latest", "best", "final_metrics")
_FLOAT_FIELDS = (
    "created_at", "updated_at", "queued_at", "started_at", "attempt_started_at",
    "finished_at", "elapsed", "eta", "progress_at", "cancel_requested_at",
)  # fmt: skip
_INT_FIELDS = (
    "attempt", "max_attempts", "step", "total_steps", "epoch", "checkpoint_step", "restarts",
    "published", "created_ms",
)  # fmt: skip


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:20]


def make_event(type_: str, attempt: int, step: int, data: Any, now: float | None = None) -> str:
    return json.dumps(
        {
            "type": type_,
            "attempt": attempt,
            "step": step,
            "time": time.time() if now is None else now,
            "data": data,
        },
        separators=(",", ":"),
        allow_nan=False,
        default=_json_default,
    )


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def decode_record(raw: Mapping[str, str]) -> dict[str, Any]:
    """A job hash as Python values (numbers parsed, JSON fields loaded)."""
    out: dict[str, Any] = dict(raw)
    for name in _FLOAT_FIELDS:
        if out.get(name) not in (None, ""):
            out[name] = float(out[name])
        else:
            out[name] = None
    for name in _INT_FIELDS:
        if out.get(name) not in (None, ""):
            out[name] = int(float(out[name]))
        else:
            out[name] = None
    for name in _JSON_FIELDS:
        value = out.get(name)
        out[name] = json.loads(value) if value else None
    out["cancel"] = out.get("cancel") == "1"
    out["model"] = out.get("model") == "1"
    return out


# ------------------------------------------------------------------------------------- Lua

_LIB = r"""
local function set_state(job_key, owner_prefix, id, old, new, now)
  redis.call('HSET', job_key, 'state', new, 'updated_at', now)
  local created = redis.call('HGET', job_key, 'created_ms') or '0'
  redis.call('ZREM', owner_prefix .. old, id)
  redis.call('ZADD', owner_prefix .. new, created, id)
end
local function state_event(stream, maxlen, attempt, step, now, data)
  local e = cjson.encode({type='state', attempt=tonumber(attempt), step=tonumber(step) or 0,
                          time=tonumber(now), data=data})
  return redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*',
                    't', 'state', 'a', attempt, 's', step or '0', 'e', e)
end
"""

# KEYS: job, config, events, queued, queue_seq, owner_jobs, idem
# ARGV: id, owner, name, config_json, now, max_attempts, fingerprint, idem_ttl, maxlen,
#       created_ms, use_idem, owner_prefix, job key prefix, max_active (0: no limit)
_CREATE = (
    _LIB
    + r"""
local function answer(status, id)
  local job_key = ARGV[13] .. id
  return {status, id, redis.call('HGETALL', job_key), redis.call('ZRANK', KEYS[4], id) or -1}
end
if ARGV[11] == '1' then
  local existing = redis.call('GET', KEYS[7])
  if existing then
    local sep = string.find(existing, ' ', 1, true)
    local id = string.sub(existing, 1, sep - 1)
    if string.sub(existing, sep + 1) ~= ARGV[7] then
      return {'conflict', id, {}, -1}
    end
    return answer('existing', id)
  end
end
local limit = tonumber(ARGV[14]) or 0
if limit > 0 then
  -- the owner's queued, running and cancelling jobs, counted in the same script that adds
  -- one: concurrent submits cannot overshoot the limit
  local active = redis.call('ZCARD', ARGV[12] .. 'queued')
    + redis.call('ZCARD', ARGV[12] .. 'running') + redis.call('ZCARD', ARGV[12] .. 'cancelling')
  if active >= limit then return {'limited', tostring(active), {}, -1} end
end
local seq = redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'owner', ARGV[2], 'name', ARGV[3], 'state', 'queued',
  'attempt', '1', 'max_attempts', ARGV[6], 'restarts', '0', 'created_at', ARGV[5],
  'updated_at', ARGV[5], 'queued_at', ARGV[5], 'created_ms', ARGV[10], 'step', '0',
  'published', '0')
if ARGV[11] == '1' then
  redis.call('HSET', KEYS[1], 'idem_key', KEYS[7])
  redis.call('SET', KEYS[7], ARGV[1] .. ' ' .. ARGV[7], 'EX', ARGV[8])
end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('ZADD', KEYS[6], ARGV[10], ARGV[1])
redis.call('ZADD', ARGV[12] .. 'queued', ARGV[10], ARGV[1])
state_event(KEYS[3], ARGV[9], '1', '0', ARGV[5], {state='queued'})
return answer('created', ARGV[1])
"""
)

# KEYS: job, lease, queued, active, events
# ARGV: id, attempt, token, lease_ms, now, maxlen, owner_prefix
_BEGIN = (
    _LIB
    + r"""
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'step')
if not rec[1] then return {'gone', ''} end
if tonumber(rec[2]) ~= tonumber(ARGV[2]) then return {'stale', rec[2]} end
-- a repeat of this very call (its reply was lost to a timeout): the lease holds our token
if rec[1] == 'running' and redis.call('GET', KEYS[2]) == ARGV[2] .. ':' .. ARGV[3] then
  return {'started', ''}
end
if rec[1] ~= 'queued' then return {'not-queued', rec[1]} end
local ok = redis.call('SET', KEYS[2], ARGV[2] .. ':' .. ARGV[3], 'NX', 'PX', ARGV[4])
if not ok then return {'leased', ''} end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
set_state(KEYS[1], ARGV[7], ARGV[1], 'queued', 'running', ARGV[5])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[5])
redis.call('HSET', KEYS[1], 'attempt_started_at', ARGV[5], 'worker', ARGV[3])
state_event(KEYS[5], ARGV[6], ARGV[2], rec[3], ARGV[5],
            {state='running', worker=ARGV[3]})
return {'started', ''}
"""
)

# KEYS: job, lease
# ARGV: attempt, token, lease_ms, then optional field/value pairs (progress)
_RENEW = r"""
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state', 'cancel')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return {'stale', ''} end
if rec[2] ~= 'running' and rec[2] ~= 'cancelling' then return {'stale', ''} end
local want = ARGV[1] .. ':' .. ARGV[2]
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= want then return {'stale', ''} end
redis.call('SET', KEYS[2], want, 'PX', ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return {'ok', rec[3] or ''}
"""

# KEYS: job, events, metrics
# ARGV: attempt, type, step, event_json, maxlen, metric ('1' to add to the history),
#       then field/value pairs for the record
_APPEND = r"""
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return false end
if rec[2] ~= 'running' and rec[2] ~= 'cancelling' then return false end
-- A retry after a lost reply (Redis died after running this): the same event (its JSON has
-- the attempt, step and a microsecond time) is already the last entry; do not add it twice.
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last then
  for i = 1, #last[2], 2 do
    if last[2][i] == 'e' and last[2][i + 1] == ARGV[4] then return last[1] end
  end
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
                      't', ARGV[2], 'a', ARGV[1], 's', ARGV[3], 'e', ARGV[4])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4]) end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return id
"""

# Drop what older attempts reported after the checkpoint this attempt resumed from.
# KEYS: job, events, metrics
# ARGV: attempt, step
_RESUME = r"""
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return false end
local step = tonumber(ARGV[2])
local attempt = tonumber(ARGV[1])
local removed = redis.call('ZREMRANGEBYSCORE', KEYS[3], '(' .. ARGV[2], '+inf')
local entries = redis.call('XRANGE', KEYS[2], '-', '+')
local pruned = 0
for _, entry in ipairs(entries) do
  local f = entry[2]
  local t, a, s
  for i = 1, #f, 2 do
    if f[i] == 't' then t = f[i + 1] elseif f[i] == 'a' then a = f[i + 1]
    elseif f[i] == 's' then s = f[i + 1] end
  end
  if t ~= 'state' and t ~= 'resume' and tonumber(a) < attempt and tonumber(s) > step then
    redis.call('XDEL', KEYS[2], entry[1])
    pruned = pruned + 1
  end
end
redis.call('HSET', KEYS[1], 'step', ARGV[2])
return {removed, pruned, redis.call('ZRANGE', KEYS[3], 0, -1)}
"""

# KEYS: job, lease, active, events
# ARGV: id, attempt, token, new_state, error, now, maxlen, stream_ttl, owner_prefix,
#       then field/value pairs
_FINISH = (
    _LIB
    + r"""
local rec = redis.call('HMGET', KEYS[1], 'attempt', 'state', 'step')
if not rec[1] or tonumber(rec[1]) ~= tonumber(ARGV[2]) then return 'stale' end
if rec[2] ~= 'running' and rec[2] ~= 'cancelling' then return 'stale' end
if redis.call('GET', KEYS[2]) == ARGV[2] .. ':' .. ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('SREM', KEYS[3], ARGV[1])
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
set_state(KEYS[1], ARGV[9], ARGV[1], rec[2], ARGV[4], ARGV[6])
redis.call('HSET', KEYS[1], 'finished_at', ARGV[6])
local data = {state=ARGV[4]}
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[5])
  data['reason'] = ARGV[5]
end
local step = redis.call('HGET', KEYS[1], 'step') or rec[3]
state_event(KEYS[4], ARGV[7], ARGV[2], step, ARGV[6], data)
redis.call('EXPIRE', KEYS[4], ARGV[8])
return 'ok'
"""
)

# KEYS: job, queued, events
# ARGV: id, now, maxlen, stream_ttl, owner_prefix
_CANCEL = (
    _LIB
    + r"""
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'step')
local state = rec[1]
if not state then return {'missing', ''} end
if state == 'queued' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  set_state(KEYS[1], ARGV[5], ARGV[1], 'queued', 'cancelled', ARGV[2])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'cancel', '1',
             'cancel_requested_at', ARGV[2], 'error', 'cancelled before it started')
  state_event(KEYS[3], ARGV[3], rec[2], rec[3], ARGV[2],
              {state='cancelled', reason='cancelled before it started'})
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  return {'cancelled', state}
elseif state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1', 'cancel_requested_at', ARGV[2])
  set_state(KEYS[1], ARGV[5], ARGV[1], 'running', 'cancelling', ARGV[2])
  state_event(KEYS[3], ARGV[3], rec[2], rec[3], ARGV[2], {state='cancelling'})
  return {'cancelling', state}
elseif state == 'cancelling' or state == 'cancelled' then
  return {state, state}
end
return {'finished', state}
"""
)

# KEYS: job, lease, active, queued, queue_seq, events
# ARGV: id, now, maxlen, stream_ttl, owner_prefix
_REAP = (
    _LIB
    + r"""
local rec = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'max_attempts', 'step',
                       'checkpoint_step')
local state = rec[1]
if not state then redis.call('SREM', KEYS[3], ARGV[1]) return {'gone', ''} end
if state ~= 'running' and state ~= 'cancelling' then
  redis.call('SREM', KEYS[3], ARGV[1])
  return {'skip', state}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'alive', ''} end
local attempt = tonumber(rec[2])
redis.call('SREM', KEYS[3], ARGV[1])
if state == 'cancelling' then
  local reason = 'cancelled; the worker was lost while stopping'
  set_state(KEYS[1], ARGV[5], ARGV[1], state, 'cancelled', ARGV[2])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'error', reason)
  state_event(KEYS[6], ARGV[3], rec[2], rec[4], ARGV[2], {state='cancelled', reason=reason})
  redis.call('EXPIRE', KEYS[6], ARGV[4])
  return {'cancelled', ''}
end
local max_attempts = tonumber(rec[3])
if attempt >= max_attempts then
  local reason = 'the worker running attempt ' .. attempt .. ' was lost (its lease expired) and '
    .. 'the restart budget of ' .. (max_attempts - 1) .. ' restarts is spent'
  set_state(KEYS[1], ARGV[5], ARGV[1], state, 'failed', ARGV[2])
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2], 'error', reason)
  state_event(KEYS[6], ARGV[3], rec[2], rec[4], ARGV[2], {state='failed', reason=reason})
  redis.call('EXPIRE', KEYS[6], ARGV[4])
  return {'failed', ''}
end
local next_attempt = attempt + 1
local seq = redis.call('INCR', KEYS[5])
redis.call('ZADD', KEYS[4], seq, ARGV[1])
set_state(KEYS[1], ARGV[5], ARGV[1], state, 'queued', ARGV[2])
redis.call('HSET', KEYS[1], 'attempt', next_attempt, 'queued_at', ARGV[2], 'published', '0')
redis.call('HINCRBY', KEYS[1], 'restarts', 1)
local reason = 'the worker running attempt ' .. attempt .. ' was lost (its lease expired); '
  .. 're-queued as attempt ' .. next_attempt
state_event(KEYS[6], ARGV[3], tostring(next_attempt), rec[4], ARGV[2],
            {state='queued', reason=reason, resume_from_step=tonumber(rec[5])})
return {'requeued', tostring(next_attempt)}
"""
)

# KEYS: job, config, events, metrics, lease, owner_jobs, idem-or-job
# ARGV: id, owner_prefix
_DELETE = r"""
local rec = redis.call('HMGET', KEYS[1], 'state', 'idem_key')
if not rec[1] then return 'missing' end
if rec[1] ~= 'succeeded' and rec[1] ~= 'failed' and rec[1] ~= 'cancelled' then
  return rec[1]
end
if rec[2] then
  local v = redis.call('GET', rec[2])
  if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then redis.call('DEL', rec[2]) end
end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZREM', ARGV[2] .. rec[1], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 'deleted'
"""


def _flatten(fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in fields.items():
        out.append(key)
        if isinstance(value, dict | list):
            out.append(json.dumps(value, separators=(",", ":"), default=_json_default))
        elif value is None:
            out.append("")
        else:
            out.append(str(value))
    return out


@dataclass(frozen=True)
class Lease:
    """What one running attempt holds: the job, its attempt number and a unique token."""

    job_id: str
    attempt: int
    token: str


# --------------------------------------------------------------------------------- sync store


class JobStore:
    """The worker side (sync redis-py client with `decode_responses=True`)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        *,
        stream_maxlen: int = 10_000,
        stream_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = stream_maxlen
        self.stream_ttl = stream_ttl_s
        self._begin = redis.register_script(_BEGIN)
        self._renew = redis.register_script(_RENEW)
        self._append = redis.register_script(_APPEND)
        self._resume = redis.register_script(_RESUME)
        self._finish = redis.register_script(_FINISH)
        self._reap = redis.register_script(_REAP)

    def _owner_prefix(self, job_id: str) -> str:
        owner = self.redis.hget(self.keys.job(job_id), "owner") or "anonymous"
        return self.keys.owner_jobs_prefix(owner)

    # -- records
    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.keys.job(job_id))
        return decode_record(raw) if raw else None

    def load_config(self, job_id: str) -> str | None:
        return self.redis.get(self.keys.config(job_id))

    # -- one attempt
    def begin(self, lease: Lease, lease_ms: int) -> tuple[str, str]:
        k = self.keys
        result = self._begin(
            keys=[k.job(lease.job_id), k.lease(lease.job_id), k.queued, k.active,
                  k.events(lease.job_id)],
            args=[lease.job_id, lease.attempt, lease.token, lease_ms, time.time(), self.maxlen,
                  self._owner_prefix(lease.job_id)],
        )  # fmt: skip
        return result[0], result[1]

    def renew(self, lease: Lease, lease_ms: int, progress: Mapping[str, Any]) -> tuple[bool, bool]:
        """Renew the lease and write progress. Returns (still ours, cancel requested)."""
        k = self.keys
        status, cancel = self._renew(
            keys=[k.job(lease.job_id), k.lease(lease.job_id)],
            args=[lease.attempt, lease.token, lease_ms, *_flatten(progress)],
        )
        return status == "ok", cancel == "1"

    def append(
        self,
        lease: Lease,
        type_: str,
        step: int,
        event_json: str,
        *,
        metric: bool = False,
        fields: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Append one event (fenced). Returns the stream id, or None for a stale attempt."""
        k = self.keys
        result = self._append(
            keys=[k.job(lease.job_id), k.events(lease.job_id), k.metrics(lease.job_id)],
            args=[lease.attempt, type_, step, event_json, self.maxlen, "1" if metric else "0",
                  *_flatten(fields or {})],
        )  # fmt: skip
        return result or None

    def resume(self, lease: Lease, step: int) -> tuple[int, int, list[str]] | None:
        """Drop metrics and events older attempts reported after `step`; returns
        (metrics removed, events removed, the remaining metric history)."""
        k = self.keys
        result = self._resume(
            keys=[k.job(lease.job_id), k.events(lease.job_id), k.metrics(lease.job_id)],
            args=[lease.attempt, step],
        )
        if not result:
            return None
        return int(result[0]), int(result[1]), list(result[2])

    def finish(
        self,
        lease: Lease,
        state: str,
        *,
        error: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> bool:
        assert state in TERMINAL_STATES
        k = self.keys
        result = self._finish(
            keys=[k.job(lease.job_id), k.lease(lease.job_id), k.active, k.events(lease.job_id)],
            args=[lease.job_id, lease.attempt, lease.token, state, error or "", time.time(),
                  self.maxlen, self.stream_ttl, self._owner_prefix(lease.job_id),
                  *_flatten(fields or {})],
        )  # fmt: skip
        return result == "ok"

    # -- reaper
    def active_jobs(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.active))

    def reap(self, job_id: str) -> tuple[str, int | None]:
        """Move a job whose lease expired to its next attempt (or fail it)."""
        k = self.keys
        status, value = self._reap(
            keys=[k.job(job_id), k.lease(job_id), k.active, k.queued, k.queue_seq,
                  k.events(job_id)],
            args=[job_id, time.time(), self.maxlen, self.stream_ttl, self._owner_prefix(job_id)],
        )  # fmt: skip
        return status, (int(value) if status == "requeued" else None)

    def unpublished(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, int]]:
        """Queued jobs (the `limit` first in line) whose Celery message was never confirmed
        sent (e.g. a crash between writing the record and publishing)."""
        ids = self.redis.zrange(self.keys.queued, 0, limit - 1)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), "state", "attempt", "published", "queued_at")
        now = time.time()
        out = []
        for job_id, (state, attempt, published, queued_at) in zip(ids, pipe.execute(), strict=True):
            if state != "queued" or attempt is None:
                continue
            if published != attempt and now - float(queued_at or 0) > older_than_s:
                out.append((job_id, int(attempt)))
        return out

    def mark_published(self, job_id: str, attempt: int) -> None:
        self.redis.hset(self.keys.job(job_id), "published", attempt)

    def published_queued(self, limit: int = 100_000) -> list[tuple[str, int]]:
        """Queued jobs (the `limit` first in line) whose message was confirmed sent."""
        ids = self.redis.zrange(self.keys.queued, 0, limit - 1)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), "state", "attempt", "published")
        out = []
        for job_id, (state, attempt, published) in zip(ids, pipe.execute(), strict=True):
            if state == "queued" and attempt is not None and published == attempt:
                out.append((job_id, int(attempt)))
        return out

    def broker_attempts(self, queue: str) -> set[tuple[str, int]]:
        """`(job_id, attempt)` of every message in the broker: waiting in `queue` or in any
        other queue kombu has bound under our prefix (workers may read different queues), or
        taken by a worker and not yet acknowledged. O(messages): the reaper calls it sparingly.
        """
        from worker.queue import message_attempt

        binding = f"{self.keys.broker_prefix}_kombu.binding."
        queues = {queue} | {
            key[len(binding) :] for key in self.redis.scan_iter(match=f"{binding}*", count=500)
        }
        pipe = self.redis.pipeline(transaction=False)
        for name in sorted(queues):
            pipe.lrange(self.keys.broker_queue(name), 0, -1)
        pipe.hvals(self.keys.broker_unacked)
        found = (message_attempt(raw) for batch in pipe.execute() for raw in batch)
        return {m for m in found if m is not None}

    # -- training processes (for their worker's parent process)
    def set_process_attempt(self, host: str, pid: int, lease: Lease) -> None:
        value = f"{lease.job_id} {lease.attempt} {lease.token}"
        self.redis.set(self.keys.process(host, pid), value, ex=30 * 24 * 3600)

    def clear_process_attempt(self, host: str, pid: int) -> None:
        self.redis.delete(self.keys.process(host, pid))

    def process_attempts(self, host: str, pids: Iterable[int]) -> dict[int, Lease]:
        """pid -> the attempt that process of `host` said it runs, for those of `pids` that
        recorded one."""
        pids = list(pids)
        values = self.redis.mget([self.keys.process(host, pid) for pid in pids]) if pids else []
        out: dict[int, Lease] = {}
        for pid, value in zip(pids, values, strict=True):
            parts = (value or "").split(" ")
            if len(parts) == 3 and parts[1].isdigit():
                out[pid] = Lease(parts[0], int(parts[1]), parts[2])
        return out

    def attempt_is_current(self, lease: Lease) -> bool:
        """Whether `lease` still runs its job: the job's current attempt, running or
        cancelling, under this very token."""
        state, attempt, worker = self.redis.hmget(
            self.keys.job(lease.job_id), "state", "attempt", "worker"
        )
        return (
            state in ("running", "cancelling")
            and attempt == str(lease.attempt)
            and worker == lease.token
        )

    # -- workers
    def heartbeat(self, worker: str) -> None:
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {worker: now_ms})
        pipe.zremrangebyscore(self.keys.workers, 0, now_ms - 24 * 3600 * 1000)
        pipe.execute()

    def worker_gone(self, worker: str) -> None:
        self.redis.zrem(self.keys.workers, worker)


# -------------------------------------------------------------------------------- async store


class AsyncJobStore:
    """The API side (redis.asyncio client with `decode_responses=True`)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        *,
        stream_maxlen: int = 10_000,
        stream_ttl_s: int = 7 * 24 * 3600,
        idempotency_ttl_s: int = 24 * 3600,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = stream_maxlen
        self.stream_ttl = stream_ttl_s
        self.idem_ttl = idempotency_ttl_s
        self._create = redis.register_script(_CREATE)
        self._cancel = redis.register_script(_CANCEL)
        self._delete = redis.register_script(_DELETE)

    async def create(
        self,
        *,
        owner: str,
        name: str | None,
        config_json: str,
        max_attempts: int,
        idempotency_key: str | None = None,
        fingerprint: str = "",
        max_active: int = 0,
    ) -> tuple[str, str, dict[str, Any] | None, int | None]:
        """Create a queued job in one round trip.

        Returns (outcome, job id, record, queue position): outcome is "created", "existing"
        (the Idempotency-Key named an earlier job: that job's record), "conflict" (the key
        was used with another request; no record) or "limited" (the owner already has
        `max_active` queued/running/cancelling jobs; the second value is that count, no
        record). A replay of an Idempotency-Key is answered before the limit is checked.
        """
        k = self.keys
        job_id = new_job_id()
        now = time.time()
        idem = k.idempotency(owner, idempotency_key) if idempotency_key else k.job(job_id)
        status, found, flat, rank = await self._create(
            keys=[k.job(job_id), k.config(job_id), k.events(job_id), k.queued, k.queue_seq,
                  k.owner_jobs(owner), idem],
            args=[job_id, owner, name or "", config_json, now, max_attempts, fingerprint,
                  self.idem_ttl, self.maxlen, int(now * 1000),
                  "1" if idempotency_key else "0", k.owner_jobs_prefix(owner),
                  k.job(""), max_active],
        )  # fmt: skip
        record = decode_record(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None
        position = int(rank) + 1 if int(rank) >= 0 else None
        return status, found, record, position

    async def mark_published(self, job_id: str, attempt: int) -> None:
        await self.redis.hset(self.keys.job(job_id), "published", attempt)

    async def get(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        """The record, or None when it does not exist or belongs to another owner."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw or (owner is not None and raw.get("owner") != owner):
            return None
        return decode_record(raw)

    async def queue_positions(self, job_ids: Iterable[str]) -> dict[str, int | None]:
        ids = list(job_ids)
        if not ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.zrank(self.keys.queued, job_id)
        ranks = await pipe.execute()
        return {j: (r + 1 if r is not None else None) for j, r in zip(ids, ranks, strict=True)}

    async def page(
        self, owner: str, state: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        index = self.keys.owner_jobs(owner, state)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrevrange(index, offset, offset + limit - 1)
        total, ids = await pipe.execute()
        if not ids:
            return [], total
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        records = [decode_record(r) for r in await pipe.execute() if r]
        return records, total

    async def count_by_state(self, states: Iterable[str]) -> dict[str, int]:
        """Jobs per state over every owner (SCAN of the per-owner state indexes)."""
        counts = {}
        for state in states:
            total = 0
            async for key in self.redis.scan_iter(self.keys.owner_jobs_pattern(state), count=500):
                total += await self.redis.zcard(key)
            counts[state] = total
        return counts

    async def load_config(self, job_id: str) -> str | None:
        return await self.redis.get(self.keys.config(job_id))

    async def cancel(self, job_id: str) -> tuple[str, str]:
        k = self.keys
        owner = await self.redis.hget(k.job(job_id), "owner") or "anonymous"
        status, previous = await self._cancel(
            keys=[k.job(job_id), k.queued, k.events(job_id)],
            args=[job_id, time.time(), self.maxlen, self.stream_ttl, k.owner_jobs_prefix(owner)],
        )
        return status, previous

    async def delete(self, job_id: str, owner: str) -> str:
        """ "deleted", "missing", or the (non-terminal) state that forbids it."""
        k = self.keys
        return await self._delete(
            keys=[*k.job_keys(job_id), k.owner_jobs(owner)],
            args=[job_id, k.owner_jobs_prefix(owner)],
        )

    async def state(self, job_id: str) -> str | None:
        return await self.redis.hget(self.keys.job(job_id), "state")

    async def read_events(
        self, job_id: str, after: str, *, count: int = 200, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        result = await self.redis.xread(
            {self.keys.events(job_id): after}, count=count, block=block_ms
        )
        if not result:
            return []
        return result[0][1]

    async def last_event_id(self, job_id: str) -> str | None:
        last = await self.redis.xrevrange(self.keys.events(job_id), "+", "-", count=1)
        return last[0][0] if last else None

    async def metrics(self, job_id: str, since_step: int | None = None) -> list[str]:
        low = since_step if since_step is not None else "-inf"
        return await self.redis.zrangebyscore(self.keys.metrics(job_id), low, "+inf")

    async def workers_alive(self, within_s: float) -> list[str]:
        now_ms = int(time.time() * 1000)
        return await self.redis.zrangebyscore(
            self.keys.workers, now_ms - int(within_s * 1000), "+inf"
        )
