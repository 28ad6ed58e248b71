"""/v1/datasets: upload (CSV or JSONL), list, inspect, delete."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import IO, Annotated, Literal

import anyio
from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile, status

from app.api.deps import DatasetStoreDep, OwnerDep, SettingsDep, StorageDep
from app.api.schemas import MAX_OFFSET, DatasetList, DatasetOut, ErrorOut, error_responses
from app.core.errors import Invalid, NotFound, TooLarge
from mtl.errors import DataError
from service.datasets import (
    DATASET_ID_RE,
    SOURCE_PREFIX,
    AsyncDatasetStore,
    dataset_key,
    new_dataset_id,
)
from service.settings import Settings

__all__ = ["router", "sweep_orphans"]

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=error_responses(401, 503))

_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json-lines": "jsonl"}
_CHUNK = 1024 * 1024


def _store_upload(source: IO[bytes], target: Path, cap: int) -> int:
    """Copy the upload to `target`, at most `cap` bytes; returns the size."""
    size = 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while chunk := source.read(_CHUNK):
            size += len(chunk)
            if size > cap:
                raise TooLarge(f"the file is larger than the upload cap of {cap} bytes")
            out.write(chunk)
    return size


def _inspect(path: Path, fmt: str, source: str, settings: Settings) -> dict[str, object]:
    """Read the stored upload once, streamed, and summarise it: `iter_records` yields one
    record at a time into `inspect_records`, which keeps only bounded state per column, so the
    memory is a chunk, a row and the summary, not the file (a 16 MiB file of short rows once
    took the API from 527 to 1438 MiB). The caps are checked row by row while it is parsed
    (before a row becomes a record): a row with more than `max_dataset_columns` columns (or
    JSON keys) or a value longer than `max_field_chars` is a `DataError` naming the row and
    column. Invalid UTF-8 (or a NUL byte) anywhere in the file is a `DataError` before the
    iteration ends, so a summary is only returned for a file that is valid text throughout."""
    from mtl.datafiles import inspect_records, iter_records

    records = iter_records(
        path,
        format=fmt,  # type: ignore[arg-type]
        name=source,
        max_columns=settings.max_dataset_columns,
        max_field_chars=settings.max_field_chars,
    )
    with contextlib.closing(records):
        info = inspect_records(records, source).to_dict()
    info.pop("source", None)
    return info


#: How long a dataset folder without a record is left alone by `sweep_orphans` (an upload in
#: progress has a folder and no record until it is checked).
ORPHAN_AGE_S = 3600.0


async def sweep_orphans(
    store: AsyncDatasetStore, *, older_than_s: float = ORPHAN_AGE_S
) -> list[str]:
    """Remove dataset folders that have no record in Redis and have not changed for
    `older_than_s` seconds (the folder and its files: newest mtime), logging each; returns
    their ids. Run at API start: an API killed between storing an upload and writing its
    record (or before removing a refused one) leaves such a folder. Younger folders may be
    uploads in progress in another API process; folders whose names are not dataset ids are
    not touched. Never raises (Redis away: logged, nothing removed)."""
    removed: list[str] = []
    if not store.storage.in_place:
        return removed  # uploads go through a local folder that is removed in every case
    datasets_dir = store.storage.data_dir / "datasets"
    try:
        stale = await anyio.to_thread.run_sync(_stale_folders, datasets_dir, older_than_s)
        if not stale:
            return removed
        pipe = store.redis.pipeline(transaction=False)
        for dataset_id in stale:
            pipe.exists(store.keys.dataset(dataset_id))
        found = await pipe.execute()
        for dataset_id, has_record in zip(stale, found, strict=True):
            if has_record:
                continue
            folder = datasets_dir / dataset_id
            await anyio.to_thread.run_sync(shutil.rmtree, folder)
            removed.append(dataset_id)
            log.warning(
                "removed the dataset folder %s: no record, unchanged for %.0f s or more",
                folder,
                older_than_s,
            )
    except Exception as exc:  # a failed sweep must not stop the API
        log.warning("the sweep of orphan dataset folders stopped: %r", exc)
    return removed


def _stale_folders(datasets_dir: Path, older_than_s: float) -> list[str]:
    """Ids of the dataset folders whose newest mtime (folder and entries) is older than
    `older_than_s` seconds."""
    if not datasets_dir.is_dir():
        return []
    cutoff = time.time() - older_than_s
    stale = []
    for folder in datasets_dir.iterdir():
        if not DATASET_ID_RE.match(folder.name) or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            newest = max([folder.stat().st_mtime, *(p.lstat().st_mtime for p in folder.iterdir())])
        except OSError:
            continue  # removed meanwhile
        if newest < cutoff:
            stale.append(folder.name)
    return sorted(stale)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a CSV or JSONL dataset",
    responses={
        **error_responses(400),
        413: {
            "model": ErrorOut,
            "description": "larger than the upload cap (plain text `Content Too Large` when the "
            "Content-Length is already over it: answered before the body is read)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        422: {"description": "not a readable CSV/JSONL file; the message names row and column"},
    },
)
async def upload_dataset(
    file: Annotated[UploadFile, File(description="UTF-8 CSV with a header row, or JSONL")],
    owner: OwnerDep,
    store: DatasetStoreDep,
    settings: SettingsDep,
    storage: StorageDep,
    name: Annotated[str | None, Form(max_length=200)] = None,
    format: Annotated[Literal["auto", "csv", "jsonl"], Form()] = "auto",
) -> DatasetOut:
    """Stores the file, checks that it parses, and reports its rows, columns and the
    distinct values of every column (candidate labels). Jobs name it as `dataset:<id>`."""
    fmt: str | None = format
    if format == "auto":
        fmt = _SUFFIXES.get(Path(file.filename or "").suffix.lower())
        if fmt is None:
            raise Invalid(
                "cannot tell the format from the file name: use .csv or .jsonl, or set `format`",
                ["body", "file"],
            )
    assert fmt is not None
    dataset_id = new_dataset_id()
    key = dataset_key(dataset_id)
    # in place: straight into the data directory; a remote store: a local upload folder first
    folder = storage.local(key) if storage.in_place else storage.cache_dir / "uploads" / dataset_id
    path = folder / f"data.{fmt}"
    source = f"{SOURCE_PREFIX}{dataset_id}"
    try:
        size = await anyio.to_thread.run_sync(
            _store_upload, file.file, path, settings.max_upload_bytes
        )
        info = await anyio.to_thread.run_sync(_inspect, path, fmt, source, settings)
        await anyio.to_thread.run_sync(storage.put_dir, folder, key)
    except DataError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise Invalid(str(exc), ["body", "file"], "data_error") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(storage.delete, key)
        raise
    finally:
        if not storage.in_place:
            shutil.rmtree(folder, ignore_errors=True)
    try:
        record = await store.add(
            owner,
            dataset_id,
            {
                "source": source,
                "name": name,
                "filename": Path(file.filename or "").name or None,
                "format": fmt,
                "size_bytes": size,
                **info,
            },
        )
    except BaseException:  # no record (Redis away, the client gone): no file either
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(storage.delete, key)
        raise
    return record


@router.get("", response_model=DatasetList, summary="List datasets (newest first)")
async def list_datasets(
    request: Request,
    owner: OwnerDep,
    store: DatasetStoreDep,
    settings: SettingsDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> DatasetList:
    limit = min(limit, settings.page_size_max)
    records, total = await store.page(owner, offset, limit)
    nxt = None
    if offset + limit < total:
        nxt = str(request.url.include_query_params(offset=offset + limit, limit=limit))
    return DatasetList(items=records, total=total, offset=offset, limit=limit, next=nxt)


@router.get(
    "/{dataset_id}",
    response_model=DatasetOut,
    summary="One dataset",
    responses=error_responses(404),
)
async def get_dataset(dataset_id: str, owner: OwnerDep, store: DatasetStoreDep) -> DatasetOut:
    record = await store.get(dataset_id, owner)
    if record is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return record


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset",
    responses=error_responses(404),
)
async def delete_dataset(dataset_id: str, owner: OwnerDep, store: DatasetStoreDep) -> Response:
    """Jobs still queued that name it will fail with a clear reason when they start."""
    if not await store.delete(dataset_id, owner):
        raise NotFound(f"dataset {dataset_id} not found")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
