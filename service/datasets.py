"""Uploaded datasets: where their files live and their records in Redis.

A dataset is a CSV or JSONL file stored as ``<data_dir>/datasets/<id>/data.<csv|jsonl>``.
Jobs name it as ``dataset:<id>``; `resolver` is the only way the worker turns a source string
into a path, so a job can never make the service read a path a client chose.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl.errors import DataError
from service.async_store import newest_first
from service.keys import Keys
from service.records import DatasetRecord

__all__ = [
    "DATASET_ID_RE",
    "SOURCE_PREFIX",
    "AsyncDatasetStore",
    "dataset_dir",
    "dataset_file",
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


def dataset_dir(data_dir: Path, dataset_id: str) -> Path:
    if not DATASET_ID_RE.match(dataset_id):
        raise ValueError(f"not a dataset id: {dataset_id!r}")
    return data_dir / "datasets" / dataset_id


def dataset_file(data_dir: Path, dataset_id: str) -> Path | None:
    """The stored file of a dataset, or None when there is none."""
    folder = dataset_dir(data_dir, dataset_id)
    for fmt in FORMATS:
        path = folder / f"data.{fmt}"
        if path.is_file():
            return path
    return None


def resolver(data_dir: Path) -> Callable[[str], Path]:
    """`resolve` for `mtl.trainer.train` / `mtl.datafiles.check_data`: dataset ids only."""

    def resolve(source: str) -> Path:
        dataset_id = parse_source(source)
        if dataset_id is None:
            raise DataError(
                "the service reads only uploaded datasets, named `dataset:<id>`", file=source
            )
        path = dataset_file(data_dir, dataset_id)
        if path is None:
            raise DataError("no such dataset (was it deleted?)", file=source)
        return path

    return resolve


class AsyncDatasetStore:
    """Dataset records (redis.asyncio, `decode_responses=True`) and their files."""

    def __init__(self, redis: Any, keys: Keys, data_dir: Path) -> None:
        self.redis = redis
        self.keys = keys
        self.data_dir = data_dir

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
        shutil.rmtree(dataset_dir(self.data_dir, dataset_id), ignore_errors=True)
        return True
