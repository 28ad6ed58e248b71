"""`/`: the dashboard page (its scripts and styles are under /static), and `/metrics` for
Prometheus."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from app.api.deps import JobStoreDep
from app.core.metrics import STATES

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    page = resources.files("app").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/metrics")
async def metrics(request: Request, jobs: JobStoreDep) -> Response:
    counts = await jobs.count_by_state(STATES)
    queue_length = await jobs.queue_length()
    body = request.app.state.metrics.render(counts, queue_length)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")
