"""The OpenAPI document: FastAPI's own, plus the schemas of bodies the app parses itself.

A job, study or ensemble body is parsed by a dependency (`app.api.validation`), strictly and
once, so no route declares it as a parameter and FastAPI would not list its schema. Each is
added here, with every model it refers to, under `components/schemas` (the routes refer to it
with `$ref`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.schemas import EnsembleCreate, JobCreate
from service.studies.spec import StudyCreate

__all__ = ["install_openapi"]

_REF = "#/components/schemas/{model}"

#: the request bodies parsed by dependencies rather than by FastAPI
BODIES = (JobCreate, StudyCreate, EnsembleCreate)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODIES:
                body = model.model_json_schema(ref_template=_REF, mode="validation")
                for name, definition in body.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = body
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
