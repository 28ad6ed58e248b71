"""Ensembles of jobs' models: their records in Redis, and which of a study's jobs make one.

An ensemble's folder is the unit ``ensembles/<id>/model`` of the artifact store
(`service.storage.ensemble_key`), written by `mtl.ensemble.export_ensemble` with copies of its
members' models, so it outlives their jobs.
The record (`service.records.EnsembleRecord`) sits in ``{p}:ensemble:{id}`` beside its owner;
the owner's index is ``{p}:owner:{o}:ensembles`` (keys in `service.keys`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from service.async_store import newest_first
from service.keys import Keys
from service.records import EnsembleRecord
from service.studies.records import TrialKind, TrialRecord, TrialState

__all__ = ["ENSEMBLE_ID_RE", "AsyncEnsembleStore", "best_trials", "new_ensemble_id"]

ENSEMBLE_ID_RE = re.compile(r"^ens_[0-9a-f]{20}$")


def new_ensemble_id() -> str:
    return "ens_" + uuid.uuid4().hex[:20]


def best_trials(trials: list[TrialRecord], maximize: bool, top: int) -> list[TrialRecord]:
    """The `top` best completed search trials (those with a value), best first by the
    objective's direction; ties keep the lower trial number first. Baselines never count."""
    done = [
        t
        for t in trials
        if t.kind is TrialKind.SEARCH and t.state is TrialState.COMPLETE and t.value is not None
    ]
    done.sort(key=lambda t: (-(t.value or 0.0) if maximize else (t.value or 0.0), t.number))
    return done[:top]


class AsyncEnsembleStore:
    """Ensemble records (redis.asyncio, `decode_responses=True`)."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def create(self, record: EnsembleRecord) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.ensemble(record.id),
            mapping={"owner": record.owner, "record": record.model_dump_json()},
        )
        pipe.zadd(
            self.keys.owner_ensembles(record.owner), {record.id: int(record.created_at * 1000)}
        )
        await pipe.execute()

    async def get(self, ensemble_id: str, owner: str) -> EnsembleRecord | None:
        """The record, or None when it does not exist or belongs to another owner."""
        if not ENSEMBLE_ID_RE.match(ensemble_id):
            return None
        raw = await self.redis.hmget(self.keys.ensemble(ensemble_id), "owner", "record")
        if raw[0] is None or raw[0] != owner or raw[1] is None:
            return None
        return EnsembleRecord.model_validate_json(raw[1])

    async def page(self, owner: str, offset: int, limit: int) -> tuple[list[EnsembleRecord], int]:
        ids, total = await newest_first(self.redis, self.keys.owner_ensembles(owner), offset, limit)
        if not ids:
            return [], total
        pipe = self.redis.pipeline(transaction=False)
        for ensemble_id in ids:
            pipe.hget(self.keys.ensemble(ensemble_id), "record")
        return [EnsembleRecord.model_validate_json(r) for r in await pipe.execute() if r], total

    async def delete(self, ensemble_id: str, owner: str) -> bool:
        """Remove the record; False when there is none of this owner's (the folder is the
        caller's to remove)."""
        if await self.get(ensemble_id, owner) is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.ensemble(ensemble_id))
        pipe.zrem(self.keys.owner_ensembles(owner), ensemble_id)
        await pipe.execute()
        return True
