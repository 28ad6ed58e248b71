"""A model as the API serves it: the archive to download, and predictions.

Shared by `/v1/jobs/{id}`, `/v1/studies/{id}` (a study's model is its best trial's) and
`/v1/ensembles/{id}`: each takes a job record (its exported model) or a model folder.
"""

from __future__ import annotations

import tarfile
import uuid
from pathlib import Path
from typing import Any

import anyio

from app.core.errors import Conflict, Invalid, NotFound
from app.core.predictors import PredictorCache
from mtl.errors import ModelError
from service.records import JobRecord, JobState
from service.settings import Settings

__all__ = ["archive_dir", "model_archive", "model_dir", "predict_texts"]


def model_dir(record: JobRecord, settings: Settings) -> Path:
    if record.state is not JobState.SUCCEEDED:
        raise Conflict(
            f"job {record.id} is {record.state}: a model exists once it has succeeded",
            record.state,
        )
    folder = settings.job_dir(record.id) / "model"
    if not record.model or not (folder / "mtl.json").is_file():
        raise NotFound(f"job {record.id} has no exported model")
    return folder


async def model_archive(model: JobRecord | Path, settings: Settings) -> Path:
    """A job's model/ (or the model folder `model`) as a .tar.gz beside it, `model.tar.gz`
    (built once, atomically; its top folder is `model/`)."""
    folder = model if isinstance(model, Path) else model_dir(model, settings)
    target = folder.with_name("model.tar.gz")
    if target.is_file() and target.stat().st_mtime >= (folder / "mtl.json").stat().st_mtime:
        return target
    return await anyio.to_thread.run_sync(archive_dir, folder, target, "model")


def archive_dir(folder: Path, target: Path, arcname: str) -> Path:
    """`folder` as a .tar.gz at `target`, written atomically."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    tmp.replace(target)
    return target


async def predict_texts(
    model: JobRecord | Path,
    texts: list[str],
    settings: Settings,
    predictors: PredictorCache,
    limiter: anyio.CapacityLimiter,
) -> list[dict[str, Any]]:
    """Every task head's prediction for `texts` with the job's model, or the model in the
    folder `model` (in a worker thread)."""
    if len(texts) > settings.max_predict_texts:
        raise Invalid(f"at most {settings.max_predict_texts} texts per call", ["body", "texts"])
    for i, text in enumerate(texts):
        if len(text) > settings.max_text_chars:
            raise Invalid(f"longer than {settings.max_text_chars} characters", ["body", "texts", i])
    folder = model if isinstance(model, Path) else model_dir(model, settings)
    try:
        predictions: list[dict[str, Any]] = await anyio.to_thread.run_sync(
            predictors.predict, folder, texts, limiter=limiter
        )
    except ModelError as exc:
        state = None if isinstance(model, Path) else model.state
        raise Conflict(f"the model cannot be used: {exc}", state) from None
    return predictions
