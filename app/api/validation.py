"""Checks a job config must pass before it is queued (shared by submit and validate)."""

from __future__ import annotations

from pathlib import Path

import anyio

from app.core.config import Settings
from app.core.errors import Invalid
from mtl.config import FileData, TrainConfig
from mtl.errors import DataError
from worker.datasets import AsyncDatasetStore, parse_source, resolver

__all__ = ["check_model_name", "check_sources"]


def _source_fields(config: TrainConfig) -> list[tuple[list[str | int], str]]:
    """Every data source of the config with its location in the request body."""
    found: list[tuple[list[str | int], str]] = []
    if isinstance(config.data, FileData):
        for split in ("train", "validation", "test"):
            value = getattr(config.data, split)
            if value:
                found.append((["body", "data", split], value))
    for i, task in enumerate(config.tasks):
        if task.data is not None:
            for split in ("train", "validation", "test"):
                value = getattr(task.data, split)
                if value:
                    found.append((["body", "tasks", i, "data", split], value))
    return found


def check_model_name(config: TrainConfig, settings: Settings) -> None:
    """A job's encoder must be an allowed hub id, or a directory under an allowed root.

    No URLs (no server-side requests to addresses a client picks), no other paths (a client
    must not make the worker read files it names), and never remote code.
    """
    if config.encoder.random_init is not None:
        return
    name = config.encoder.model
    loc: list[str | int] = ["body", "encoder", "model"]
    if "://" in name or name.lower().startswith(("http:", "https:", "file:")):
        raise Invalid("URLs are not accepted: name an allowed model id", loc)
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path:
        target = Path(name).expanduser().resolve()
        for root in settings.model_roots:
            if target.is_relative_to(root.expanduser().resolve()) and target.is_dir():
                return
        raise Invalid(
            "local model paths are accepted only under the service's model roots"
            + (
                f" ({', '.join(str(r) for r in settings.model_roots)})"
                if settings.model_roots
                else ""
            )
            + "; name an allowed model id instead",
            loc,
        )
    if name not in settings.allowed_models:
        raise Invalid(
            f"model {name!r} is not allowed here; allowed: {', '.join(settings.allowed_models)}",
            loc,
        )


async def check_sources(
    config: TrainConfig, owner: str, datasets: AsyncDatasetStore, settings: Settings
) -> None:
    fields = _source_fields(config)
    if not fields:
        return
    for loc, source in fields:
        dataset_id = parse_source(source)
        if dataset_id is None:
            raise Invalid(
                "the service reads only uploaded datasets: name one as `dataset:<id>` "
                "(upload with POST /v1/datasets)",
                loc,
            )
        if await datasets.get(dataset_id, owner) is None:
            raise Invalid(f"dataset {dataset_id} not found", loc)
    from mtl.datafiles import check_data

    try:
        await anyio.to_thread.run_sync(check_data, config, resolver(settings.data_dir))
    except DataError as exc:
        loc = next((loc for loc, s in fields if s == exc.file), ["body", "data"])
        raise Invalid(str(exc), loc, "data_error") from None
