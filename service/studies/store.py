"""Studies in Redis: the record, its trials, its event stream, and which worker drives it.

One driver at a time moves a study on (`acquire`: a lease per study, renewed every pass, that
another worker takes over when it lapses); the API creates a study, reads it, asks to cancel
it (a flag the driver obeys) and deletes it once it is over. The keys are in `service.keys`.

Event stream entries have the fields ``t`` (type: `state`, `trial`, `best`) and ``e`` (the
`StudyEvent` as JSON); the entry id is the SSE event id, as for a job.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.keys import Keys
from service.studies.records import STUDY_TERMINAL, StudyRecord, StudyState, TrialRecord
from service.studies.spec import StudyCreate

__all__ = ["AsyncStudyStore", "StudyEvent", "StudyStore", "new_study_id"]

# renew the lease if it is ours, take it if it is free
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


def new_study_id() -> str:
    return "study_" + uuid.uuid4().hex[:20]


class StudyEvent(BaseModel):
    type: Literal["state", "trial", "best"]
    time: float
    data: dict[str, Any] = Field(default_factory=dict)


def _event_fields(type_: str, data: dict[str, Any]) -> dict[str, str]:
    event = StudyEvent(type=type_, time=time.time(), data=data)
    return {"t": type_, "e": event.model_dump_json()}


class StudyStore:
    """The driver's side (sync redis-py, `decode_responses=True`)."""

    def __init__(self, redis: Any, keys: Keys, *, maxlen: int = 10_000, ttl_s: int = 7 * 86400):
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self._acquire = redis.register_script(_ACQUIRE)

    def active(self) -> list[str]:
        return sorted(self.redis.smembers(self.keys.studies_active))

    def acquire(self, study_id: str, token: str, ttl_ms: int) -> bool:
        return bool(self._acquire(keys=[self.keys.study_lock(study_id)], args=[token, ttl_ms]))

    def release(self, study_id: str, token: str) -> None:
        key = self.keys.study_lock(study_id)
        if self.redis.get(key) == token:
            self.redis.delete(key)

    def get(self, study_id: str) -> tuple[StudyRecord, StudyCreate, bool] | None:
        """The record, the request and whether a cancel was asked."""
        raw = self.redis.hmget(self.keys.study(study_id), "record", "spec", "cancel")
        if raw[0] is None or raw[1] is None:
            return None
        record = StudyRecord.model_validate_json(raw[0])
        return record, StudyCreate.model_validate_json(raw[1]), raw[2] == "1"

    def save(self, record: StudyRecord) -> None:
        self.redis.hset(self.keys.study(record.id), "record", record.model_dump_json())

    def trials(self, study_id: str) -> dict[int, TrialRecord]:
        raw = self.redis.hgetall(self.keys.study_trials(study_id))
        return {int(n): TrialRecord.model_validate_json(v) for n, v in raw.items()}

    def save_trial(self, study_id: str, trial: TrialRecord) -> None:
        self.redis.hset(
            self.keys.study_trials(study_id), str(trial.number), trial.model_dump_json()
        )

    def event(self, study_id: str, type_: str, data: dict[str, Any]) -> None:
        self.redis.xadd(
            self.keys.study_events(study_id),
            _event_fields(type_, data),
            maxlen=self.maxlen,
            approximate=True,
        )

    def finished(self, study_id: str) -> None:
        """The study is over: no driver looks at it again; its events expire later."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(self.keys.studies_active, study_id)
        pipe.expire(self.keys.study_events(study_id), self.ttl_s)
        pipe.execute()


class AsyncStudyStore:
    """The API's side (redis.asyncio, `decode_responses=True`). Its `read_events`,
    `last_event_id` and `state` let `app.core.events` stream a study like a job."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def create(self, record: StudyRecord, spec: StudyCreate) -> None:
        k = self.keys
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            k.study(record.id),
            mapping={
                "owner": record.owner,
                "record": record.model_dump_json(),
                "spec": spec.model_dump_json(),
            },
        )
        pipe.zadd(k.owner_studies(record.owner), {record.id: int(record.created_at * 1000)})
        pipe.xadd(k.study_events(record.id), _event_fields("state", {"state": record.state}))
        pipe.sadd(k.studies_active, record.id)
        await pipe.execute()

    async def get(self, study_id: str, owner: str) -> StudyRecord | None:
        raw = await self.redis.hmget(self.keys.study(study_id), "owner", "record", "cancel")
        if raw[0] is None or raw[0] != owner or raw[1] is None:
            return None
        record = StudyRecord.model_validate_json(raw[1])
        if raw[2] == "1" and record.state not in STUDY_TERMINAL:
            record.cancel_requested = True
        return record

    async def spec(self, study_id: str) -> StudyCreate | None:
        raw = await self.redis.hget(self.keys.study(study_id), "spec")
        return StudyCreate.model_validate_json(raw) if raw else None

    async def trials(self, study_id: str) -> list[TrialRecord]:
        raw = await self.redis.hvals(self.keys.study_trials(study_id))
        return sorted((TrialRecord.model_validate_json(v) for v in raw), key=lambda t: t.number)

    async def page(self, owner: str, offset: int, limit: int) -> tuple[list[StudyRecord], int]:
        from service.async_store import newest_first

        ids, total = await newest_first(self.redis, self.keys.owner_studies(owner), offset, limit)
        records = [await self.get(study_id, owner) for study_id in ids]
        return [r for r in records if r is not None], total

    async def request_cancel(self, study_id: str) -> None:
        await self.redis.hset(self.keys.study(study_id), "cancel", "1")

    async def delete(self, study_id: str, owner: str) -> None:
        k = self.keys
        prefix = k.study_optuna(study_id)
        journal = [key async for key in self.redis.scan_iter(match=f"{prefix}:*", count=1000)]
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(
            k.study(study_id), k.study_trials(study_id), k.study_events(study_id),
            k.study_lock(study_id), *journal,
        )  # fmt: skip
        pipe.zrem(k.owner_studies(owner), study_id)
        pipe.srem(k.studies_active, study_id)
        await pipe.execute()

    # -- the event stream (the interface of `app.core.events`)
    async def read_events(
        self, study_id: str, after: str, *, count: int = 200, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, str]]]:
        result = await self.redis.xread(
            {self.keys.study_events(study_id): after}, count=count, block=block_ms
        )
        return result[0][1] if result else []

    async def last_event_id(self, study_id: str) -> str | None:
        last = await self.redis.xrevrange(self.keys.study_events(study_id), "+", "-", count=1)
        return last[0][0] if last else None

    async def state(self, study_id: str) -> StudyState | None:
        raw = await self.redis.hget(self.keys.study(study_id), "record")
        return StudyRecord.model_validate_json(raw).state if raw else None
