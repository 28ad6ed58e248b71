"""The job record's state machine in Redis: the worker's side, and what both sides share.

The job record (a hash, `service.records.JobRecord`) is the source of truth; Celery only
carries `(job_id, attempt)` (`service.queue`). Every state change is one Lua script
(`service/lua/`, loaded by `service.scripts`), so it is atomic and fenced by the attempt
number.

States::

    queued ──begin──> running ──finish──> succeeded | failed | cancelled
      │                 │  └──cancel──> cancelling ──finish/reap──> cancelled
      │                 └──reap (lease expired)──> queued (attempt + 1)  or  failed (budget spent)
      └──cancel──> cancelled

`JobStore` (sync redis-py) is what the worker uses; `service.async_store.AsyncJobStore`
(redis.asyncio) is what the API uses (create, cancel, delete, reads). Both take the same
`Keys`. The scripts compute the per-owner, per-state index key names from a prefix (so this
expects a single Redis, not a cluster).

Event stream entries have the fields ``t`` (type), ``a`` (attempt), ``s`` (step) and ``e``
(the `service.records.Event` as JSON); the entry id is the SSE event id. The metrics history
is a sorted set of the same JSON strings (score = step).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from service.keys import Keys
from service.records import TERMINAL_STATES, Event, JobRecord, JobState, json_default
from service.scripts import lua

__all__ = [
    "BeginOutcome",
    "Begun",
    "CreateOutcome",
    "Created",
    "JobStore",
    "Lease",
    "NewJob",
    "ReapOutcome",
    "Reaped",
    "Renewal",
    "Resumed",
    "flatten",
    "new_job_id",
]


def new_job_id() -> str:
    return "job_" + uuid.uuid4().hex[:20]


def flatten(fields: Mapping[str, Any]) -> list[str]:
    """Record fields as the field/value strings HSET takes (dicts and lists as JSON)."""
    out: list[str] = []
    for key, value in fields.items():
        out.append(key)
        if isinstance(value, dict | list):
            out.append(json.dumps(value, separators=(",", ":"), default=json_default))
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


class BeginOutcome(StrEnum):
    STARTED = "started"  # the lease is ours: train
    GONE = "gone"  # the job was deleted
    STALE = "stale"  # the job is on another attempt (a duplicate or late message)
    NOT_QUEUED = "not-queued"  # cancelled, or already finished
    LEASED = "leased"  # another process holds this attempt's lease


@dataclass(frozen=True)
class Begun:
    outcome: BeginOutcome
    detail: str = ""  # the current attempt (stale) or state (not-queued)


@dataclass(frozen=True)
class Renewal:
    ours: bool  # the lease is still this attempt's (False: stale, stop)
    cancel: bool  # a cancel was requested


@dataclass(frozen=True)
class Resumed:
    metrics_dropped: int
    events_dropped: int
    history: list[Event] = field(default_factory=list)  # the metric history that remains


class ReapOutcome(StrEnum):
    GONE = "gone"
    SKIP = "skip"  # not running or cancelling
    ALIVE = "alive"  # its lease is held
    REQUEUED = "requeued"  # moved to its next attempt: publish it
    FAILED = "failed"  # the restart budget is spent
    CANCELLED = "cancelled"  # lost while cancelling


@dataclass(frozen=True)
class Reaped:
    outcome: ReapOutcome
    attempt: int | None = None  # the next attempt (requeued)


class CreateOutcome(StrEnum):
    CREATED = "created"
    EXISTING = "existing"  # the idempotency key named an earlier job: that job
    CONFLICT = "conflict"  # the idempotency key was used with another request
    LIMITED = "limited"  # the owner has its limit of queued, running and cancelling jobs


@dataclass(frozen=True)
class Created:
    outcome: CreateOutcome
    job_id: str | None = None  # created or existing
    record: JobRecord | None = None  # None also when an existing job was deleted since
    position: int | None = None  # in the queue, 1 = next (while queued)
    active: int | None = None  # limited: how many active jobs the owner has


@dataclass(frozen=True)
class NewJob:
    """A job to create (`create.lua`): by the API for a request, by a study's driver for a
    trial. `idempotency_key` is the full Redis key that makes a repeat return the same job."""

    owner: str
    name: str | None
    config_json: str
    max_attempts: int
    idempotency_key: str | None = None
    fingerprint: str = ""
    max_active: int = 0  # the owner's limit of active jobs (0: none)
    fields: Mapping[str, Any] = field(default_factory=dict)  # more record fields
    idempotency_ttl_s: int | None = None  # default: the store's
    # routing (service.queue): where the message goes, the place in line, the device limit
    devices: int = 1
    priority: str = "normal"
    queue: str | None = None  # None: the base queue
    max_devices: int = 0  # the owner's device limit (0: none); over it the job is held

    def script_call(self, keys: Keys, maxlen: int, idem_ttl: int) -> tuple[list[str], list[Any]]:
        job_id = new_job_id()
        now = time.time()
        idem = self.idempotency_key or keys.job(job_id)
        return (
            [keys.job(job_id), keys.config(job_id), keys.events(job_id), keys.queued,
             keys.queue_seq, keys.owner_jobs(self.owner), idem, keys.held],
            [job_id, self.owner, self.name or "", self.config_json, now, self.max_attempts,
             self.fingerprint, self.idempotency_ttl_s or idem_ttl, maxlen, int(now * 1000),
             "1" if self.idempotency_key else "0", keys.owner_jobs_prefix(self.owner),
             keys.job(""), self.max_active, self.priority, self.devices, self.max_devices,
             "queue", self.queue or "", *flatten(self.fields)],
        )  # fmt: skip

    @staticmethod
    def result(reply: list[Any]) -> Created:
        status, found, flat, rank = reply
        outcome = CreateOutcome(status)
        if outcome is CreateOutcome.LIMITED:
            return Created(outcome, active=int(found))
        if outcome is CreateOutcome.CONFLICT:
            return Created(outcome, job_id=found)
        record = (
            JobRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True))) if flat else None
        )
        position = int(rank) + 1 if int(rank) >= 0 else None
        return Created(outcome, job_id=found, record=record, position=position)


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
        self._begin = redis.register_script(lua("begin"))
        self._renew = redis.register_script(lua("renew"))
        self._append = redis.register_script(lua("append"))
        self._resume = redis.register_script(lua("resume"))
        self._finish = redis.register_script(lua("finish"))
        self._reap = redis.register_script(lua("reap"))
        self._create = redis.register_script(lua("create"))
        self._cancel = redis.register_script(lua("cancel"))
        self._release = redis.register_script(lua("release"))
        self.idem_ttl = 30 * 24 * 3600

    def _owner_prefix(self, job_id: str) -> str:
        owner = self.redis.hget(self.keys.job(job_id), "owner") or "anonymous"
        return self.keys.owner_jobs_prefix(owner)

    # -- records
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    def load_config(self, job_id: str) -> str | None:
        return self.redis.get(self.keys.config(job_id))

    # -- jobs a worker creates and cancels (a study's trials)
    def create(self, request: NewJob) -> Created:
        keys, args = request.script_call(self.keys, self.maxlen, self.idem_ttl)
        return request.result(self._create(keys=keys, args=args))

    def cancel(self, job_id: str) -> JobState | None:
        """Cancel a job (see `service.async_store.AsyncJobStore.cancel`); its state after."""
        k = self.keys
        owner = self.redis.hget(k.job(job_id), "owner") or "anonymous"
        status, _ = self._cancel(
            keys=[k.job(job_id), k.queued, k.events(job_id)],
            args=[job_id, time.time(), self.maxlen, self.stream_ttl, k.owner_jobs_prefix(owner)],
        )
        return JobState(status) if status in set(JobState) else None

    def metric_history(self, job_id: str) -> list[Event]:
        return [
            Event.model_validate_json(m)
            for m in self.redis.zrange(self.keys.metrics(job_id), 0, -1)
        ]

    # -- one attempt
    def begin(self, lease: Lease, lease_ms: int) -> Begun:
        k = self.keys
        result = self._begin(
            keys=[k.job(lease.job_id), k.lease(lease.job_id), k.queued, k.active,
                  k.events(lease.job_id)],
            args=[lease.job_id, lease.attempt, lease.token, lease_ms, time.time(), self.maxlen,
                  self._owner_prefix(lease.job_id)],
        )  # fmt: skip
        return Begun(BeginOutcome(result[0]), result[1])

    def renew(self, lease: Lease, lease_ms: int, progress: Mapping[str, Any]) -> Renewal:
        """Renew the lease and write the progress fields."""
        k = self.keys
        status, cancel = self._renew(
            keys=[k.job(lease.job_id), k.lease(lease.job_id)],
            args=[lease.attempt, lease.token, lease_ms, *flatten(progress)],
        )
        return Renewal(ours=status == "ok", cancel=cancel == "1")

    def append(
        self,
        lease: Lease,
        event: Event,
        *,
        metric: bool = False,
        fields: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Append one event (fenced) and write `fields` to the record; `metric` adds it to the
        metric history too. Returns the stream id, or None for a stale attempt."""
        k = self.keys
        result = self._append(
            keys=[k.job(lease.job_id), k.events(lease.job_id), k.metrics(lease.job_id)],
            args=[lease.attempt, event.type, event.step, event.to_json(), self.maxlen,
                  "1" if metric else "0", *flatten(fields or {})],
        )  # fmt: skip
        return result or None

    def resume(self, lease: Lease, step: int) -> Resumed | None:
        """Drop metrics and events older attempts reported after `step`. None: stale."""
        k = self.keys
        result = self._resume(
            keys=[k.job(lease.job_id), k.events(lease.job_id), k.metrics(lease.job_id)],
            args=[lease.attempt, step],
        )
        if not result:
            return None
        history = [Event.model_validate_json(member) for member in result[2]]
        return Resumed(int(result[0]), int(result[1]), history)

    def finish(
        self,
        lease: Lease,
        state: JobState,
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
                  *flatten(fields or {})],
        )  # fmt: skip
        return result == "ok"

    # -- reaper
    def active_jobs(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.active))

    def reap(self, job_id: str) -> Reaped:
        """Move a job whose lease expired to its next attempt (or fail it)."""
        k = self.keys
        status, value = self._reap(
            keys=[k.job(job_id), k.lease(job_id), k.active, k.queued, k.queue_seq,
                  k.events(job_id)],
            args=[job_id, time.time(), self.maxlen, self.stream_ttl, self._owner_prefix(job_id)],
        )  # fmt: skip
        outcome = ReapOutcome(status)
        return Reaped(outcome, int(value) if outcome is ReapOutcome.REQUEUED else None)

    def unpublished(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, int]]:
        """Queued jobs (the `limit` first in line) whose Celery message was never confirmed
        sent (e.g. a crash between writing the record and publishing)."""
        ids = self.redis.zrange(self.keys.queued, 0, limit - 1)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.keys.job(job_id), "state", "attempt", "published", "queued_at", "held")
        now = time.time()
        out = []
        rows = zip(ids, pipe.execute(), strict=True)
        for job_id, (state, attempt, published, queued_at, held) in rows:
            if state != JobState.QUEUED or attempt is None or held == "1":
                continue
            if published != attempt and now - float(queued_at or 0) > older_than_s:
                out.append((job_id, int(attempt)))
        return out

    def mark_published(self, job_id: str, attempt: int) -> None:
        self.redis.hset(self.keys.job(job_id), "published", attempt)

    def job_queue(self, job_id: str) -> str | None:
        """The Celery queue of the job (None: the base queue)."""
        return self.redis.hget(self.keys.job(job_id), "queue") or None

    def release_held(self, max_devices: int) -> list[tuple[str, int, str | None]]:
        """Release the held jobs whose owner has room under `max_devices` now (in queue
        order): `(job_id, attempt, queue)` of each, to publish."""
        k = self.keys
        flat = self._release(keys=[k.held], args=[k.job(""), f"{k.prefix}:owner:", max_devices])
        return [(flat[i], int(flat[i + 1]), flat[i + 2] or None) for i in range(0, len(flat), 3)]

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
            if state == JobState.QUEUED and attempt is not None and published == attempt:
                out.append((job_id, int(attempt)))
        return out

    def broker_attempts(self, *queue: str) -> set[tuple[str, int]]:
        """`(job_id, attempt)` of every message in the broker: waiting in the `queue`s or in
        any other queue kombu has bound under our prefix (workers may read different queues),
        or taken by a worker and not yet acknowledged. O(messages): the reaper calls it
        sparingly."""
        from service.queue import message_attempt

        binding = f"{self.keys.broker_prefix}_kombu.binding."
        queues = set(queue) | {
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
            state in (JobState.RUNNING, JobState.CANCELLING)
            and attempt == str(lease.attempt)
            and worker == lease.token
        )

    # -- workers
    def heartbeat(self, worker: str, devices: int = 1) -> None:
        """The worker is alive and has `devices` devices (what the API routes jobs by)."""
        now_ms = int(time.time() * 1000)
        cutoff = now_ms - 24 * 3600 * 1000  # workers silent for a day are forgotten
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {worker: now_ms})
        pipe.hset(self.keys.worker_devices, worker, devices)
        pipe.zrangebyscore(self.keys.workers, 0, cutoff)
        pipe.zremrangebyscore(self.keys.workers, 0, cutoff)
        forgotten = pipe.execute()[2]
        if forgotten:
            self.redis.hdel(self.keys.worker_devices, *forgotten)

    def worker_gone(self, worker: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.keys.workers, worker)
        pipe.hdel(self.keys.worker_devices, worker)
        pipe.execute()
