"""/v1/configs: ready-made example configs, and validation without queueing (the dashboard's
submit form uses both)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.api.deps import DatasetStoreDep, OwnerDep, SettingsDep
from app.api.schemas import JobCreate, error_responses
from app.api.validation import check_model_name, check_sources, strict_job_body
from mtl.config import TrainConfig

__all__ = ["router"]

router = APIRouter(prefix="/configs", tags=["configs"], responses=error_responses(401, 503))


class Example(BaseModel):
    name: str
    summary: str
    config: dict[str, Any]


class Validated(BaseModel):
    valid: bool = True
    tasks: list[str]
    config: dict[str, Any]


@cache
def _examples() -> list[Example]:
    folder = resources.files("app").joinpath("examples")
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            config = json.loads(entry.read_text("utf-8"))
            out.append(Example(name=entry.name[:-5], summary=config.get("name", ""), config=config))
    return out


@router.get("/examples", response_model=list[Example], summary="Example job configs")
async def examples(owner: OwnerDep) -> list[Example]:
    return _examples()


@router.post(
    "/validate",
    response_model=Validated,
    summary="Check a job config (and the datasets it names) without queueing it",
    responses={
        **error_responses(400, 413),
        422: {"description": "`detail[].loc` names the field"},
    },
)
async def validate(
    request: Request,
    body: JobCreate,
    owner: OwnerDep,
    datasets: DatasetStoreDep,
    settings: SettingsDep,
) -> Validated:
    body = strict_job_body(await request.body())
    config = TrainConfig.model_validate(body.model_dump(exclude={"name"}))
    check_model_name(config, settings)
    await check_sources(config, owner, datasets, settings)
    return Validated(tasks=config.task_names, config=config.model_dump(mode="json"))
