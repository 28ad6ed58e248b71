"""A job body, validated once: parsed strictly into the config type, then the checks it must
pass before it is queued (its model name, the datasets it names and their contents).

`valid_job` is the one dependency `POST /v1/jobs` and `POST /v1/configs/validate` share
(`app.api.deps.ValidJobDep`); the routes declare no body parameter, so FastAPI parses nothing
itself (the OpenAPI schema of the body is declared by `job_body_openapi`).
"""

from __future__ import annotations

import email.message
import json
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from app.api.schemas import JobCreate
from app.core.errors import Invalid
from mtl.budget import GIB, encoder_shape, estimate
from mtl.config import FileData, TrainConfig
from mtl.datafiles.reading import is_valid_unicode
from mtl.errors import DataError
from service.async_store import AsyncJobStore
from service.configs import parse_strict
from service.datasets import AsyncDatasetStore, parse_source, resolver
from service.queue import device_refusal
from service.settings import Settings

__all__ = [
    "body_openapi",
    "check_budget",
    "check_devices",
    "check_model_name",
    "check_sources",
    "job_body_openapi",
    "parse_body",
    "parse_job_body",
    "strict_body",
]

M = TypeVar("M", bound=BaseModel)


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def parse_job_body(raw: bytes, content_type: str | None) -> JobCreate:
    """The request body as a job (see `parse_body`)."""
    return parse_body(JobCreate, raw, content_type)


def parse_body(model: type[M], raw: bytes, content_type: str | None) -> M:
    """The request body as `model`, strictly, answered as FastAPI answers a body it parses
    itself: no body or not JSON is a 422 at `body`, malformed JSON a 422 `json_invalid`,
    bytes that are not text a 400."""
    if not raw:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    if not _is_json(content_type):
        raise RequestValidationError(
            [{"type": "model_attributes_type", "loc": ("body",),
              "msg": "the body must be JSON (Content-Type: application/json)", "input": None}]
        )  # fmt: skip
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
              "input": {}, "ctx": {"error": exc.msg}}]
        ) from None  # fmt: skip
    except ValueError:  # not UTF-8/16/32
        raise HTTPException(400, "There was an error parsing the body") from None
    except RecursionError:
        raise _too_deep() from None
    try:
        bad = _lone_surrogate(data, ["body"])
        if bad is not None:
            raise RequestValidationError(
                [{"type": "string_unicode", "loc": tuple(bad), "input": None,
                  "msg": "not valid Unicode (a lone surrogate escape such as \\ud800)"}]
            )  # fmt: skip
        return strict_body(model, data)
    except RecursionError:  # nested deep enough for our walks, if not for the JSON parser
        raise _too_deep() from None


def _too_deep() -> RequestValidationError:
    return RequestValidationError(
        [{"type": "json_invalid", "loc": ("body",), "msg": "JSON nested too deeply", "input": {}}]
    )


def _lone_surrogate(value: Any, loc: list[str | int]) -> list[str | int] | None:
    """Where in parsed JSON a string (or a key) holds a lone surrogate, which no UTF-8 text
    can; None when nowhere."""
    if isinstance(value, str):
        return None if is_valid_unicode(value) else loc
    if isinstance(value, dict):
        for key, item in value.items():
            if not is_valid_unicode(key):
                return loc
            found = _lone_surrogate(item, [*loc, key])
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, [*loc, i])
            if found is not None:
                return found
    return None


def strict_body(model: type[M], data: Any) -> M:
    """The parsed body validated without type coercion: `"epochs": "3"`, `true` or `false` for
    a number, a number for a string are 422s, as the published schema says, instead of being
    converted (a number without a fractional part counts as an integer, as in JSON Schema).
    Errors have FastAPI's shape (`detail[].loc` starts with "body")."""
    try:
        return parse_strict(model, data)
    except ValidationError as exc:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def job_body_openapi(examples: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `requestBody` of a route that takes a job (for `openapi_extra`)."""
    return body_openapi("JobCreate", examples)


def body_openapi(schema: str, examples: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `requestBody` of a route whose body a dependency parses (for `openapi_extra`); the
    app adds the model's schema to the components (`app.api.openapi`)."""
    content: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{schema}"}}
    if examples:
        content["examples"] = examples
    return {"requestBody": {"required": True, "content": {"application/json": content}}}


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
    if config.mlm.enabled and config.mlm.data:
        found.append((["body", "mlm", "data"], config.mlm.data))
    return found


def check_model_name(config: TrainConfig, settings: Settings) -> None:
    """A job's encoder must be an allowed hub id, or a directory under an allowed root.

    No URLs (no server-side requests to addresses a client picks), no other paths (a client
    must not make the worker read files it names), and never remote code. This holds for a
    `random_init` encoder too: its tokenizer is loaded from `encoder.model`. A refusal says
    "not allowed" and nothing about the path (whether it exists, what the roots are).
    """
    name = config.encoder.model
    loc: list[str | int] = ["body", "encoder", "model"]
    if "://" in name or name.lower().startswith(("http:", "https:", "file:")):
        raise Invalid("model not allowed: URLs are not accepted; name an allowed model id", loc)
    looks_like_path = name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
    if looks_like_path:
        target = Path(name).expanduser().resolve()
        for root in settings.model_roots:
            if target.is_relative_to(root.expanduser().resolve()) and target.is_dir():
                _check_weight_files(target, loc)
                return
        raise Invalid(
            "model not allowed: local paths are accepted only under the service's model roots; "
            "name an allowed model id instead",
            loc,
        )
    if name not in settings.allowed_models:
        raise Invalid(
            f"model not allowed here; allowed: {', '.join(settings.allowed_models)}",
            loc,
        )


async def check_devices(config: TrainConfig, settings: Settings, jobs: AsyncJobStore) -> None:
    """A job that needs more devices than any live worker has (or than an API key may hold)
    could never run: refused now rather than queued for ever."""
    workers = await jobs.worker_devices(within_s=3 * settings.heartbeat_s)
    refusal = device_refusal(config.devices, workers, settings.max_devices_per_key)
    if refusal:
        raise Invalid(refusal, ["body", "devices"])


def check_budget(config: TrainConfig, settings: Settings) -> None:
    """The job's estimated parameters and training memory (`mtl.budget`) within the service's
    limits; unknown for a hub model that is not on this machine (then nothing is checked)."""
    shape = encoder_shape(config)
    if shape is None:
        return
    need = estimate(config, shape)
    if need.params > settings.max_job_params:
        raise Invalid(
            f"the model has about {need.params:,} parameters, over this service's limit of "
            f"{settings.max_job_params:,}",
            ["body", "encoder"],
        )
    limit = settings.max_job_memory_gib * GIB
    if need.total > limit:
        raise Invalid(
            f"the job needs {need.describe()} to train, over this service's limit of "
            f"{settings.max_job_memory_gib:g} GiB: lower batch_size, encoder.max_length, the "
            "model's size or the dummy data's",
            ["body"],
        )


#: weight files in a pickle-based format (`torch.load` runs code unless `weights_only`)
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _check_weight_files(folder: Path, loc: list[str | int]) -> None:
    """A local model must hold its weights as safetensors, and only so: with a pickle-format
    weight file beside them a loader could still pick that one."""
    names = [f.name for f in folder.iterdir() if f.is_file()]
    pickled = sorted(n for n in names if n.lower().endswith(_PICKLE_WEIGHTS))
    if pickled:
        raise Invalid(
            f"the model directory holds pickle-format weights ({', '.join(pickled)}): "
            "only safetensors are accepted",
            loc,
        )
    if not any(n.endswith(".safetensors") for n in names):
        raise Invalid("the model directory has no .safetensors weights", loc)


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
    from mtl.datafiles import check_data, read_records

    resolve = resolver(datasets.storage)
    try:
        await anyio.to_thread.run_sync(check_data, config, resolve)
        if config.mlm.enabled and config.mlm.data:  # unlabeled texts: the column, every row
            source = config.mlm.data
            await anyio.to_thread.run_sync(
                lambda: read_records(
                    resolve(source), text_column=config.mlm.text_column, name=source
                )
            )
    except DataError as exc:
        loc = next((loc for loc, s in fields if s == exc.file), ["body", "data"])
        raise Invalid(str(exc), loc, "data_error") from None
