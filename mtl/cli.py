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
    model_dir: Annotated[Path, typer.Argument(help="an exported model directory")],
    texts: Annotated[list[str], typer.Argument(help="texts to classify")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Classify TEXTS with every task head of the model in MODEL_DIR."""
    from mtl.predict import Predictor

    try:
        predictor = Predictor.load(model_dir)
        results = predictor.predict(list(texts))
    except MTLError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        sys.stdout.write(json.dumps(results, indent=1) + "\n")
        return
    table = Table("text", *predictor.task_names)
    for text, row in zip(texts, results, strict=True):
        cells = [f"{r['label']} ({r['probabilities'][r['label']]:.2f})" for r in row.values()]
        table.add_row(text[:60], *cells)
    console.print(table)


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
