"""The job store's API side (redis.asyncio): create, read, page, cancel, delete, events.

The same state machine as `service.store` (its docstring draws it), the same `Keys` and Lua
scripts; the worker's side (begin, renew, append, finish, reap) lives there.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from service.keys import Keys
from service.records import JobRecord, JobState
from service.scripts import lua
from service.store import Created, CreateOutcome, NewJob

__all__ = [
    "AsyncJobStore",
    "CancelOutcome",
    "Cancelled",
    "CreateOutcome",
    "Created",
    "DeleteOutcome",
    "Deleted",
    "NewJob",
    "newest_first",
]


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # was queued (or already cancelled)
    CANCELLING = "cancelling"  # was running: it stops within a step
    FINISHED = "finished"  # already succeeded or failed
    MISSING = "missing"


@dataclass(frozen=True)
class Cancelled:
    outcome: CancelOutcome
    previous: JobState | None = None


class DeleteOutcome(StrEnum):
    DELETED = "deleted"
    NOT_FINISHED = "not-finished"  # queued, running or cancelling: cancel it first
    MISSING = "missing"


@dataclass(frozen=True)
class Deleted:
    outcome: DeleteOutcome
    state: JobState | None = None  # the state that forbids it (not-finished)


async def newest_first(redis: Any, index: str, offset: int, limit: int) -> tuple[list[str], int]:
    """One page of an owner's index (a sorted set by time), newest first, and its size."""
    pipe = redis.pipeline(transaction=False)
    pipe.zcard(index)
    pipe.zrevrange(index, offset, offset + limit - 1)
    total, ids = await pipe.execute()
    return list(ids), int(total)


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
        self._create = redis.register_script(lua("create"))
        self._cancel = redis.register_script(lua("cancel"))
        self._delete = redis.register_script(lua("delete"))

    async def create(self, request: NewJob) -> Created:
        """Create a queued job in one round trip (see `Created`). A replay of an
        Idempotency-Key is answered before the owner's limit of active jobs is checked."""
        keys, args = request.script_call(self.keys, self.maxlen, self.idem_ttl)
        return request.result(await self._create(keys=keys, args=args))

    async def mark_published(self, job_id: str, attempt: int) -> None:
        await self.redis.hset(self.keys.job(job_id), "published", attempt)

    async def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The record, or None when it does not exist or belongs to another owner."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        if not raw or (owner is not None and raw.get("owner") != owner):
            return None
        return JobRecord.from_hash(raw)

    async def queue_length(self) -> int:
        return int(await self.redis.zcard(self.keys.queued))

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
    ) -> tuple[list[JobRecord], int]:
        ids, total = await newest_first(
            self.redis, self.keys.owner_jobs(owner, state), offset, limit
        )
        if not ids:
            return [], total
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        records = [JobRecord.from_hash(r) for r in await pipe.execute() if r]
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

    async def cancel(self, job_id: str) -> Cancelled:
        k = self.keys
        owner = await self.redis.hget(k.job(job_id), "owner") or "anonymous"
        status, previous = await self._cancel(
            keys=[k.job(job_id), k.queued, k.events(job_id)],
            args=[job_id, time.time(), self.maxlen, self.stream_ttl, k.owner_jobs_prefix(owner)],
        )
        return Cancelled(CancelOutcome(status), JobState(previous) if previous else None)

    async def delete(self, job_id: str, owner: str) -> Deleted:
        """Delete a finished job's keys (its files are the caller's)."""
        k = self.keys
        status = await self._delete(
            keys=[*k.job_keys(job_id), k.owner_jobs(owner)],
            args=[job_id, k.owner_jobs_prefix(owner)],
        )
        if status in (DeleteOutcome.DELETED, DeleteOutcome.MISSING):
            return Deleted(DeleteOutcome(status))
        return Deleted(DeleteOutcome.NOT_FINISHED, JobState(status))

    async def state(self, job_id: str) -> JobState | None:
        state = await self.redis.hget(self.keys.job(job_id), "state")
        return JobState(state) if state else None

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

    async def worker_devices(self, within_s: float) -> dict[str, int]:
        """The live workers (a heartbeat within `within_s`) -> the devices each declared."""
        names = await self.workers_alive(within_s)
        if not names:
            return {}
        values = await self.redis.hmget(self.keys.worker_devices, names)
        return {n: int(v or 1) for n, v in zip(names, values, strict=True)}

    async def workers_alive(self, within_s: float) -> list[str]:
        now_ms = int(time.time() * 1000)
        return await self.redis.zrangebyscore(
            self.keys.workers, now_ms - int(within_s * 1000), "+inf"
        )
