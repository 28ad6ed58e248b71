"""/v1/configs: ready-made example configs, and validation without queueing (the dashboard's
submit form uses both)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from app.api.deps import OwnerDep, ValidJobDep
from app.api.schemas import error_responses
from app.api.validation import job_body_openapi

__all__ = ["router"]

router = APIRouter(prefix="/v1/configs", tags=["configs"], responses=error_responses(401, 503))


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
    openapi_extra=job_body_openapi(),
    responses={
        **error_responses(400, 413),
        422: {"description": "`detail[].loc` names the field"},
    },
)
async def validate(job: ValidJobDep) -> Validated:
    """The same checks as `POST /v1/jobs` (one dependency), without queueing."""
    config = job.model_dump(mode="json", exclude={"name", "priority"})
    return Validated(tasks=job.task_names, config=config)
