"""A model as the API serves it: the archive to download, and predictions.

Shared by `/v1/jobs/{id}`, `/v1/studies/{id}` (a study's model is its best trial's) and
`/v1/ensembles/{id}`. A model lies in the artifact store (`service.storage`) under a prefix:
``<prefix>/model/`` (the folder) and ``<prefix>/model.tar.gz`` (the archive the worker wrote
beside it). A job's prefix is its record's ``artifacts`` (``jobs/<id>`` for jobs from before it
existed), an ensemble's ``ensembles/<id>``. Downloads stream the archive from the store;
predictions load the folder from a local copy (`Storage.stage_dir`, cached).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi.responses import FileResponse, Response, StreamingResponse

from app.core.errors import Conflict, Invalid, NotFound
from app.core.predictors import PredictorCache
from mtl.errors import ModelError, TorchRequired
from mtl.ort_predict import has_onnx
from service.records import JobRecord, JobState
from service.settings import Settings
from service.storage import ARCHIVES, Storage, StorageError, archive_dir, job_key

__all__ = ["delete_job_files", "model_download", "model_prefix", "predict_texts", "stage_model"]

_CHUNK = 1024 * 1024


def model_prefix(record: JobRecord, label: str | None = None) -> str:
    """Where a succeeded job's model lies; Conflict before it succeeded, NotFound without a
    model. `label` names the job in the messages (default ``job <id>``)."""
    label = label or f"job {record.id}"
    if record.state is not JobState.SUCCEEDED:
        raise Conflict(
            f"{label} is {record.state}: a model exists once it has succeeded", record.state
        )
    if not record.model:
        raise NotFound(f"{label} has no exported model")
    return record.artifacts or job_key(record.id)


def _prefix(model: JobRecord | str) -> str:
    return model if isinstance(model, str) else model_prefix(model)


async def stage_model(model: JobRecord | str, storage: Storage) -> Path:
    """A local folder with the model (the stored one in place; a cached copy otherwise)."""
    prefix = _prefix(model)
    name = f"job {model.id}" if isinstance(model, JobRecord) else prefix
    try:
        folder = await anyio.to_thread.run_sync(storage.stage_dir, f"{prefix}/model")
    except StorageError:
        if storage.in_place:
            raise NotFound(f"{name} has no exported model") from None
        raise
    if not (folder / "mtl.json").is_file():
        raise NotFound(f"{name} has no exported model")
    return folder


async def model_download(
    model: JobRecord | str, storage: Storage, filename: str, fmt: str = "pytorch"
) -> Response:
    """The model as a .tar.gz in the format `fmt` (`ARCHIVES`): streamed from the store (in
    place: the file, built once for models from before the worker wrote it). A model without
    an ONNX export has no `onnx` archive: 409."""
    prefix = _prefix(model)
    name = f"job {model.id}'s model" if isinstance(model, JobRecord) else f"the model {prefix}"
    state = model.state if isinstance(model, JobRecord) else None
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'}
    if storage.in_place:
        folder = await stage_model(model, storage)
        target = folder.with_name(ARCHIVES[fmt])
        if fmt == "onnx" and not has_onnx(folder):
            raise Conflict(f"{name} has no ONNX export (`mtl export MODEL --onnx` adds one)", state)
        fresh = target.is_file() and (
            target.stat().st_mtime >= (folder / "mtl.json").stat().st_mtime
        )
        if not fresh:
            await anyio.to_thread.run_sync(
                lambda: archive_dir(folder, target, "model", onnx_only=fmt == "onnx")
            )
        return FileResponse(target, media_type="application/gzip", filename=filename)
    key = f"{prefix}/{ARCHIVES[fmt]}"
    try:
        size = await anyio.to_thread.run_sync(storage.size, key)
    except FileNotFoundError:
        if fmt == "onnx":
            raise Conflict(f"{name} has no ONNX export", state) from None
        raise NotFound(f"{name} has no archive in the store") from None
    reader = await anyio.to_thread.run_sync(storage.open, key)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await anyio.to_thread.run_sync(reader.read, _CHUNK):
                yield chunk
        finally:
            await anyio.to_thread.run_sync(reader.close)

    headers["Content-Length"] = str(size)
    return StreamingResponse(chunks(), media_type="application/gzip", headers=headers)


async def delete_job_files(record: JobRecord, storage: Storage, predictors: PredictorCache) -> None:
    """Remove a deleted job's files from the store (every attempt's) and its loaded model."""
    predictors.evict(storage.staged_path(f"{record.artifacts or job_key(record.id)}/model"))
    await anyio.to_thread.run_sync(storage.delete, job_key(record.id))


async def predict_texts(
    model: JobRecord | str,
    texts: list[str],
    settings: Settings,
    storage: Storage,
    predictors: PredictorCache,
    limiter: anyio.CapacityLimiter,
) -> list[dict[str, Any]]:
    """Every task head's prediction for `texts` with the job's model, or the model under the
    store prefix `model` (in a thread of `limiter`, batched with concurrent calls on the same
    model: `PredictorCache.predict_batched`)."""
    if len(texts) > settings.max_predict_texts:
        raise Invalid(f"at most {settings.max_predict_texts} texts per call", ["body", "texts"])
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise Invalid(f"longer than {settings.max_text_chars} characters", ["body", "texts", i])
    folder = await stage_model(model, storage)
    try:
        predictions = await predictors.predict_batched(folder, texts, limiter)
    except TorchRequired as exc:  # the lean API install (`mtl-jobs[api]`): ONNX exports only
        state = None if isinstance(model, str) else model.state
        raise Conflict(
            f"this API install has no PyTorch: {exc.reason}; re-export the model with "
            "`mtl export MODEL_DIR --onnx` (or, for a job, train it again with onnx.export on), "
            "or install mtl-jobs[api-torch]",
            state,
        ) from None
    except ModelError as exc:
        state = None if isinstance(model, str) else model.state
        raise Conflict(f"the model cannot be used: {exc}", state) from None
    return predictions
