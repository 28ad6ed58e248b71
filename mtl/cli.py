"""`mtl`: train, validate and predict locally; `mtl serve` runs the job service.

mtl train CONFIG [--output DIR] [--dry-run] [--no-resume]
mtl validate CONFIG
mtl predict MODEL_DIR TEXT...
mtl serve [--host H] [--port P] [--data-dir D] [--redis-url URL]
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.config import TrainConfig, load_config
from mtl.errors import MTLError

DEFAULT_URL = "http://127.0.0.1:8000"

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def relative_to(config_path: Path) -> Callable[[str], Path]:
    """Resolve data paths in a config file relative to the file's own folder."""
    base = config_path.resolve().parent

    def resolve(source: str) -> Path:
        path = Path(source).expanduser()
        return path if path.is_absolute() else base / path

    return resolve


def _load(config_path: Path) -> TrainConfig:
    try:
        return load_config(config_path)
    except MTLError as exc:
        raise _fail(str(exc)) from None


def metrics_table(title: str, tasks: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("task", "loss", "accuracy", "macro-F1", "weighted-F1"):
        table.add_column(col, justify="right" if col != "task" else "left")
    for name, m in tasks.items():
        table.add_row(
            name,
            f"{m['loss']:.4f}",
            f"{m['accuracy']:.4f}",
            f"{m.get('macro_f1', float('nan')):.4f}",
            f"{m.get('weighted_f1', float('nan')):.4f}",
        )
    return table


class RichProgress(Callback):
    """A progress bar with step, epoch, per-task loss/accuracy/F1 and ETA."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=console,
        )
        self.bar: Any = None
        self.f1: dict[str, float] = {}

    def on_train_begin(self, state: TrainState, control: TrainControl) -> None:
        self.progress.start()
        self.bar = self.progress.add_task(
            "train",
            total=state.total_steps,
            completed=state.step,
            epoch=state.epoch + 1,
            metrics="",
        )

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        self.progress.update(self.bar, completed=state.step, epoch=state.epoch + 1)

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        parts = []
        for name, m in metrics["tasks"].items():
            f1 = f" f1 {self.f1[name]:.3f}" if name in self.f1 else ""
            parts.append(f"{name}: loss {m['loss']:.3f} acc {m['accuracy']:.3f}{f1}")
        self.progress.update(self.bar, metrics=" | ".join(parts))

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        self.f1 = {t: m["macro_f1"] for t, m in metrics["tasks"].items()}
        self.progress.console.print(
            metrics_table(f"{metrics['split']} at step {state.step}", metrics["tasks"])
        )

    def on_train_end(self, state: TrainState, outcome: str, control: TrainControl) -> None:
        self.progress.stop()


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML or JSON training config")],
    output: Annotated[Path, typer.Option("--output", "-o", help="run directory")] = Path(
        "runs/latest"
    ),
    dry_run: Annotated[bool, typer.Option(help="run one batch, then stop")] = False,
    resume: Annotated[bool, typer.Option(help="resume from the last checkpoint in OUTPUT")] = True,
    tensorboard: Annotated[
        bool, typer.Option(help="write TensorBoard event files to OUTPUT/tensorboard")
    ] = True,
) -> None:
    """Train a multi-task model from CONFIG."""
    from mtl.tensorboard import TensorBoardCallback
    from mtl.trainer import train as run_training

    cfg = _load(config)
    control = TrainControl()

    def interrupt(signum: int, frame: Any) -> None:
        if control.should_stop:
            raise KeyboardInterrupt
        console.print("[yellow]stopping after this step (Ctrl-C again to abort)[/]")
        control.stop("interrupted")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        result = run_training(
            cfg,
            output,
            callbacks=[RichProgress()]
            + (
                [TensorBoardCallback(output / "tensorboard")] if tensorboard and not dry_run else []
            ),
            control=control,
            resolve=relative_to(config),
            resume=resume and not dry_run,
            max_batches=1 if dry_run else None,
        )
    except MTLError as exc:
        raise _fail(str(exc), 1) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if result.outcome == "stopped":
        console.print(f"[yellow]stopped at step {result.state.step}[/]: {result.state.stop_reason}")
        raise typer.Exit(130 if result.state.stop_reason == "interrupted" else 0)
    if dry_run:
        console.print(f"[green]dry run ok[/]: one batch trained on {len(cfg.tasks)} tasks")
        return
    if result.metrics.get("test"):
        console.print(metrics_table("test", result.metrics["test"]["tasks"]))
    console.print(f"[green]model exported to[/] {result.model_dir}")


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML or JSON training config")]) -> None:
    """Check CONFIG and the data it names, without training."""
    from mtl.datafiles import check_data

    cfg = _load(config)
    try:
        prepared = check_data(cfg, relative_to(config))
    except MTLError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]ok[/]: {len(cfg.tasks)} tasks ({', '.join(cfg.task_names)})")
    if prepared is not None:
        for split in ("train", "validation", "test"):
            rows = sum(len(s) for s in prepared.split(split))
            console.print(f"  {split}: {rows} rows")


@app.command()
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
    if job is not None:
        texts = list(args)
        with _client(url, api_key) as client:
            results = _service(lambda: client.predict(job, texts))
    else:
        from mtl.predict import Predictor

        if len(args) < 2:
            raise _fail("give MODEL_DIR and at least one TEXT (or --job ID TEXT...)")
        texts = list(args[1:])
        try:
            results = Predictor.load(Path(args[0])).predict(texts)
        except MTLError as exc:
            raise _fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(results, indent=1) + "\n")
        return
    tasks = list(results[0]) if results else []
    table = Table("text", *tasks)
    for text, row in zip(texts, results, strict=True):
        cells = [f"{r['label']} ({r['probabilities'][r['label']]:.2f})" for r in row.values()]
        table.add_row(text[:60], *cells)
    console.print(table)


# ------------------------------------------------------------------------- service client

UrlOption = Annotated[str, typer.Option("--url", envvar="MTL_URL", help="the service's address")]
KeyOption = Annotated[
    str | None, typer.Option("--api-key", envvar="MTL_API_KEY", help="API key (Bearer)")
]


def _client(url: str, api_key: str | None) -> Any:
    from mtl.client import JobClient

    return JobClient(url, api_key)


def _service(call: Callable[[], Any]) -> Any:
    from mtl.client import ServiceError

    try:
        return call()
    except ServiceError as exc:
        raise _fail(str(exc), 1) from None


def _job_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    step = f"{p.get('step', 0)}/{p.get('total_steps') or '?'}"
    extra = f" (queue position {job['queue_position']})" if job.get("queue_position") else ""
    reason = f": {job['error']}" if job.get("error") else ""
    return f"{job['id']}  {job['state']}{extra}  step {step}{reason}"


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="YAML or JSON training config")],
    name: Annotated[str | None, typer.Option(help="a label for the job")] = None,
    follow: Annotated[bool, typer.Option(help="stream its metrics until it ends")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Submit CONFIG to the service as a job."""
    cfg = _load(config)
    with _client(url, api_key) as client:
        job = _service(lambda: client.submit(cfg.model_dump(mode="json"), name=name))
        console.print(f"submitted [bold]{job['id']}[/] ({job['state']})")
        if follow:
            _follow(client, job["id"])


@app.command()
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


@app.command()
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


def _follow(client: Any, job_id: str) -> None:
    """A live table of per-task metrics fed by the job's event stream."""
    latest: dict[str, dict[str, Any]] = {}
    header: dict[str, Any] = {"text": f"{job_id}: waiting"}

    def render() -> Table:
        table = _latest_table(latest)
        table.title = header["text"]
        return table

    from mtl.client import ServiceError

    try:
        _follow_events(client, job_id, latest, header, render, console)
    except ServiceError as exc:
        raise _fail(str(exc), 1) from None
    final = header.get("final")
    console.print(f"job {job_id} ended: [bold]{final}[/]")
    if final != "succeeded":
        raise typer.Exit(1)


def _follow_events(
    client: Any,
    job_id: str,
    latest: dict[str, dict[str, Any]],
    header: dict[str, Any],
    render: Callable[[], Table],
    out: Console,
) -> None:
    from rich.live import Live

    with Live(render(), console=out, refresh_per_second=4, transient=False) as live:
        for event in client.events(job_id):
            if event.type == "log":
                total = event.data.get("total_steps")
                header["text"] = f"{job_id}: step {event.step}" + (f"/{total}" if total else "")
                for task, m in (event.data.get("tasks") or {}).items():
                    latest.setdefault(task, {})["train"] = {"step": event.step, **m}
            elif event.type == "evaluate":
                split = event.data.get("split", "validation")
                for task, m in (event.data.get("tasks") or {}).items():
                    keep = {k: m[k] for k in ("loss", "accuracy", "macro_f1") if k in m}
                    latest.setdefault(task, {})[split] = {"step": event.step, **keep}
            elif event.type == "state":
                header["text"] = f"{job_id}: {event.data.get('state', '')}"
            elif event.type == "end":
                header["final"] = event.data.get("state")
            live.update(render())


@app.command()
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
        if job["state"] not in ("succeeded", "failed", "cancelled"):
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


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="job id")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Cancel a job (a queued one never starts; a running one stops within a step)."""
    with _client(url, api_key) as client:
        out = _service(lambda: client.cancel(job_id))
    console.print(f"{job_id}: {out['state']}")


@app.command()
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


@app.command()
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
    """Run the job service: Redis (embedded unless --redis-url), one worker, and the API."""
    from app.serve import serve as run_service  # the service is optional for library users

    run_service(host=host, port=port, data_dir=data_dir, redis_url=redis_url)


if __name__ == "__main__":
    app()
