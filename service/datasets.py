"""Uploaded datasets: where their files live and their records in Redis.

A dataset is a CSV or JSONL file stored as the unit ``datasets/<id>`` of the artifact store
(`service.storage`), holding ``data.<csv|jsonl>``: in place, ``<data_dir>/datasets/<id>/``.
Jobs name it as ``dataset:<id>``; `resolver` is the only way the worker turns a source string
into a path (staging the unit from a remote store), so a job can never make the service read a
path a client chose.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from mtl.errors import DataError
from service.async_store import newest_first
from service.keys import Keys
from service.records import DatasetRecord
from service.storage import Storage, StorageError

__all__ = [
    "DATASET_ID_RE",
    "SOURCE_PREFIX",
    "AsyncDatasetStore",
    "data_file",
    "dataset_dir",
    "dataset_file",
    "dataset_key",
    "new_dataset_id",
    "parse_source",
    "resolver",
]

SOURCE_PREFIX = "dataset:"
DATASET_ID_RE = re.compile(r"^ds_[0-9a-f]{20}$")
FORMATS = ("csv", "jsonl")


def new_dataset_id() -> str:
    return "ds_" + uuid.uuid4().hex[:20]


def parse_source(source: str) -> str | None:
    """The dataset id of a ``dataset:<id>`` source, or None when it is anything else."""
    if not source.startswith(SOURCE_PREFIX):
        return None
    dataset_id = source[len(SOURCE_PREFIX) :]
    return dataset_id if DATASET_ID_RE.match(dataset_id) else None


def dataset_key(dataset_id: str) -> str:
    """The dataset's unit in the artifact store."""
    if not DATASET_ID_RE.match(dataset_id):
        raise ValueError(f"not a dataset id: {dataset_id!r}")
    return f"datasets/{dataset_id}"


def dataset_dir(data_dir: Path, dataset_id: str) -> Path:
    """The dataset's folder in the data directory (the in-place store's unit)."""
    return data_dir / dataset_key(dataset_id)


def data_file(folder: Path) -> Path | None:
    """The data file of a dataset folder, or None when there is none."""
    for fmt in FORMATS:
        path = folder / f"data.{fmt}"
        if path.is_file():
            return path
    return None


def dataset_file(storage: Storage, dataset_id: str) -> Path | None:
    """A local copy of a dataset's file (its stored path in place), or None when the store
    holds no such dataset. StorageError when the store cannot be reached."""
    try:
        folder = storage.stage_dir(dataset_key(dataset_id))
    except StorageError:
        if storage.in_place or storage.manifest(dataset_key(dataset_id)) is not None:
            raise
        return None
    return data_file(folder)


def resolver(storage: Storage) -> Callable[[str], Path]:
    """`resolve` for `mtl.trainer.train` / `mtl.datafiles.check_data`: dataset ids only."""

    def resolve(source: str) -> Path:
        dataset_id = parse_source(source)
        if dataset_id is None:
            raise DataError(
                "the service reads only uploaded datasets, named `dataset:<id>`", file=source
            )
        path = dataset_file(storage, dataset_id)
        if path is None:
            raise DataError("no such dataset (was it deleted?)", file=source)
        return path

    return resolve


class AsyncDatasetStore:
    """Dataset records (redis.asyncio, `decode_responses=True`) and their files."""

    def __init__(self, redis: Any, keys: Keys, storage: Storage) -> None:
        self.redis = redis
        self.keys = keys
        self.storage = storage

    async def add(self, owner: str, dataset_id: str, info: dict[str, Any]) -> DatasetRecord:
        now = time.time()
        record = DatasetRecord.model_validate({**info, "id": dataset_id, "created_at": now})
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.dataset(dataset_id),
            mapping={"owner": owner, "created_at": now, "record": record.model_dump_json()},
        )
        pipe.zadd(self.keys.owner_datasets(owner), {dataset_id: int(now * 1000)})
        await pipe.execute()
        return record

    async def get(self, dataset_id: str, owner: str) -> DatasetRecord | None:
        if not DATASET_ID_RE.match(dataset_id):
            return None
        raw = await self.redis.hmget(self.keys.dataset(dataset_id), "owner", "record")
        if raw[0] is None or raw[0] != owner:
            return None
        return DatasetRecord.model_validate_json(raw[1])

    async def page(self, owner: str, offset: int, limit: int) -> tuple[list[DatasetRecord], int]:
        ids, total = await newest_first(self.redis, self.keys.owner_datasets(owner), offset, limit)
        if not ids:
            return [], total
        pipe = self.redis.pipeline(transaction=False)
        for dataset_id in ids:
            pipe.hget(self.keys.dataset(dataset_id), "record")
        return [DatasetRecord.model_validate_json(r) for r in await pipe.execute() if r], total

    async def delete(self, dataset_id: str, owner: str) -> bool:
        if await self.get(dataset_id, owner) is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.dataset(dataset_id))
        pipe.zrem(self.keys.owner_datasets(owner), dataset_id)
        await pipe.execute()
        await anyio.to_thread.run_sync(self.storage.delete, dataset_key(dataset_id))
        return True
