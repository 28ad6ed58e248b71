"""`mtl serve`, added to the `mtl` command as a plugin (entry point `mtl.cli`: serve)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import uvicorn  # noqa: F401  (without the service extra this plugin is skipped, not broken)

__all__ = ["register"]


def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="jobs, datasets and models (default: MTL_DATA_DIR)")
    ] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="use this Redis; default: start an embedded one")
    ] = None,
) -> None:
    """Run the job service: Redis (embedded unless --redis-url), one worker, and the API.
    One at a time per data directory: a second one exits with status 1, naming the first."""
    from app.serve import serve as run_service  # uvicorn and the app load when it runs
    from mtl.ort_predict import torch_installed
    from service.embedded import DataDirInUse

    if not torch_installed():  # the lean API install (`mtl-jobs[api]`)
        typer.echo(
            "mtl serve: it runs a training worker, which needs torch, and this install has "
            "none: pip install 'mtl-jobs[service]' (to run only the API, which predicts with "
            "models' ONNX exports: uvicorn --factory app.main:create_app)",
            err=True,
        )
        raise typer.Exit(1)
    try:
        run_service(host=host, port=port, data_dir=data_dir, redis_url=redis_url)
    except DataDirInUse as exc:
        typer.echo(f"mtl serve: {exc}", err=True)
        raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    app.command()(serve)
