"""The service client's commands, added to `mtl` as a plugin (entry point `mtl.cli`: client).

mtl submit CONFIG [--name N] [--priority high|normal|low] [--follow]
mtl jobs [--state S] | status ID [--json] | logs ID [--follow] | cancel ID | download ID
mtl predict --job ID TEXT...   (and, as before, `mtl predict MODEL_DIR TEXT...`)
mtl study submit FILE [--follow] | status ID [--json] | cancel ID   (`service.study_cli`)

Each talks to the service over HTTP (`service.client.JobClient`); `--url` / `MTL_URL` and
`--api-key` / `MTL_API_KEY` say where and as whom.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from mtl.cli import _fail, _load, console, predict_local, print_predictions, replace_command
from mtl.summary import summarise
from service.client import JobClient, ServiceError
from service.records import PRIORITIES, TERMINAL_STATES


class PriorityChoice(StrEnum):
    """`--priority` (typer lists an enum's values as the choices): `service.records.PRIORITIES`."""

    high = "high"
    normal = "normal"
    low = "low"


assert tuple(PriorityChoice) == PRIORITIES

__all__ = ["register"]

DEFAULT_URL = "http://127.0.0.1:8000"

UrlOption = Annotated[str, typer.Option("--url", envvar="MTL_URL", help="the service's address")]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="MTL_API_KEY", help="API key (Bearer)")
]


def _client(url: str, api_key: str | None) -> JobClient:
    return JobClient(url, api_key)


def _service(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ServiceError as exc:
        raise _fail(str(exc), 1) from None


def _job_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step = f"{p.get('step', 0)}/{p.get('total_steps') or '?'}"
    extra = f" (queue position {job['queue_position']})" if job.get("queue_position") else ""
    if job.get("queued_reason"):
        extra += f"; {job['queued_reason']}"
    reason = f": {job['error']}" if job.get("error") else ""
    return f"{job['id']}  {job['state']}{extra}  step {step}{reason}"


def submit(
    config: Annotated[Path, typer.Argument(help="YAML or JSON training config")],
    name: Annotated[str | None, typer.Option(help="a label for the job")] = None,
    priority: Annotated[
        PriorityChoice, typer.Option(help="high jobs start before normal ones, normal before low")
    ] = PriorityChoice.normal,
    follow: Annotated[bool, typer.Option(help="stream its metrics until it ends")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Submit CONFIG to the service as a job."""
    cfg = _load(config)
    with _client(url, api_key) as client:
        body = cfg.model_dump(mode="json")
        job = _service(lambda: client.submit(body, name=name, priority=priority.value))
        console.print(f"submitted {_job_line(job)}")
        if follow:
            _follow(client, job["id"])


def jobs(
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(help="how many")] = 20,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """List jobs, newest first."""
    with _client(url, api_key) as client:
        items = _service(lambda: client.jobs(state, limit))
    table = Table("id", "name", "state", "step", "latest validation macro-F1")
    for job in items:
        p = job.get("progress") or {}
        f1 = ", ".join(
            f"{task}={m['validation']['macro_f1']:.3f}"
            for task, m in (job.get("latest_metrics") or {}).items()
            if "validation" in m and "macro_f1" in m["validation"]
        )
        table.add_row(
            job["id"],
            job.get("name") or "",
            job["state"],
            f"{p.get('step', 0)}/{p.get('total_steps') or '?'}",
            f1,
        )
    console.print(table)


def status(
    job_id: Annotated[str, typer.Argument(help="job id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """One job's state, progress and metrics."""
    with _client(url, api_key) as client:
        job = _service(lambda: client.job(job_id))
    if as_json:
        sys.stdout.write(json.dumps(job, indent=1) + "\n")
        return
    console.print(_job_line(job))
    console.print(_latest_table(job.get("latest_metrics") or {}))


def _latest_table(latest: dict[str, Any]) -> Table:
    table = Table("task", "split", "step", "loss", "accuracy", "macro-F1", title="latest")
    for task, splits in latest.items():
        for split, m in splits.items():
            f1 = m.get("macro_f1")
            table.add_row(
                task,
                split,
                str(m.get("step", "")),
                f"{m['loss']:.4f}" if "loss" in m else "",
                f"{m['accuracy']:.4f}" if "accuracy" in m else "",
                f"{f1:.4f}" if f1 is not None else "",
            )
    return table


def _follow(client: JobClient, job_id: str) -> None:
    """A live table of per-task metrics fed by the job's event stream."""
    latest: dict[str, dict[str, Any]] = {}
    header: dict[str, Any] = {"text": f"{job_id}: waiting"}

    def render() -> Table:
        table = _latest_table(latest)
        table.title = header["text"]
        return table

    try:
        _follow_events(client, job_id, latest, header, render, console)
    except ServiceError as exc:
        raise _fail(str(exc), 1) from None
    final = header.get("final")
    console.print(f"job {job_id} ended: [bold]{final}[/]")
    if final != "succeeded":
        raise typer.Exit(1)


def _follow_events(
    client: JobClient,
    job_id: str,
    latest: dict[str, dict[str, Any]],
    header: dict[str, Any],
    render: Callable[[], Table],
    out: Console,
) -> None:
    with Live(render(), console=out, refresh_per_second=4, transient=False) as live:
        for event in client.events(job_id):
            if event.type == "log":
                total = event.data.get("total_steps")
                header["text"] = f"{job_id}: step {event.step}" + (f"/{total}" if total else "")
                for task, m in (event.data.get("tasks") or {}).items():
                    latest.setdefault(task, {})["train"] = {"step": event.step, **m}
            elif event.type == "evaluate":
                split = event.data.get("split", "validation")
                for task, scores in summarise(event.data).tasks.items():
                    latest.setdefault(task, {})[split] = {"step": event.step, **scores.scores()}
            elif event.type == "state":
                header["text"] = f"{job_id}: {event.data.get('state', '')}"
            elif event.type == "end":
                header["final"] = event.data.get("state")
            live.update(render())


def logs(
    job_id: Annotated[str, typer.Argument(help="job id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="a live table until the end")] = (
        False
    ),
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """A job's events: every log, evaluation, checkpoint and state change so far (or live)."""
    with _client(url, api_key) as client:
        if follow:
            _follow(client, job_id)
            return
        job = _service(lambda: client.job(job_id))
        if job["state"] not in TERMINAL_STATES:
            console.print(_job_line(job))
            console.print(_latest_table(job.get("latest_metrics") or {}))
            return
        events = _service(lambda: list(client.events(job_id)))
        for event in events:
            sys.stdout.write(
                json.dumps(
                    {
                        "id": event.id,
                        "type": event.type,
                        "step": event.step,
                        "attempt": event.attempt,
                        "data": event.data,
                    }
                )
                + "\n"
            )


def cancel(
    job_id: Annotated[str, typer.Argument(help="job id")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Cancel a job (a queued one never starts; a running one stops within a step)."""
    with _client(url, api_key) as client:
        out = _service(lambda: client.cancel(job_id))
    console.print(f"{job_id}: {out['state']}")


def download(
    job_id: Annotated[str, typer.Argument(help="job id")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file to write")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Download a job's exported model (.tar.gz)."""
    target = output or Path(f"{job_id}-model.tar.gz")
    with _client(url, api_key) as client:
        _service(lambda: client.download(job_id, target))
    console.print(f"saved {target}")


def predict(
    args: Annotated[list[str], typer.Argument(help="MODEL_DIR TEXT... (or TEXT... with --job)")],
    job: Annotated[
        str | None, typer.Option(help="predict with a service job's model instead of a dir")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Classify texts with every task head: `mtl predict MODEL_DIR TEXT...` (local model) or
    `mtl predict --job ID TEXT...` (a model trained by the service)."""
    if job is None:
        if len(args) < 2:
            raise _fail("give MODEL_DIR and at least one TEXT (or --job ID TEXT...)")
        texts = list(args[1:])
        print_predictions(texts, predict_local(Path(args[0]), texts), as_json)
        return
    texts = list(args)
    with _client(url, api_key) as client:
        results = _service(lambda: client.predict(job, texts))
    print_predictions(texts, results, as_json)


def register(app: typer.Typer) -> None:
    """Add the client's commands to the `mtl` app (and `--job` to `mtl predict`, and the
    `mtl study` commands)."""
    from service.study_cli import study_app  # it uses this module's options and helpers

    for command in (submit, jobs, status, logs, cancel, download):
        app.command()(command)
    replace_command(app, "predict", predict)
    app.add_typer(study_app, name="study")
