"""`mtl study`: hyperparameter studies on the service (added by `service.cli.register`).

mtl study submit FILE [--name N] [--follow]   FILE: the body of POST /v1/studies, YAML or JSON
mtl study status ID [--json]                   state, best, leaderboard, importances, verdict
mtl study cancel ID                            running trials are cancelled, no new one starts

`submit --follow` shows a live table of the trials fed by the study's event stream, then the
multi-task verdict; it exits 0 when the study succeeded and 1 otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from mtl.cli import _fail, console
from service.cli import DEFAULT_URL, KeyOption, UrlOption, _client, _service
from service.client import JobClient, ServiceError, StudyStreamEvent
from service.studies.records import STUDY_TERMINAL

__all__ = ["study_app"]

study_app = typer.Typer(
    help="Hyperparameter studies: search a config space on the service, then compare the best "
    "multi-task model with single-task models.",
    no_args_is_help=True,
)

STUDY_OVER = STUDY_TERMINAL

#: the state of a trial after each `trial` event
_TRIAL_STATE = {
    "queued": "running",
    "reported": "running",
    "finished": "complete",
    "pruned": "pruned",
    "failed": "failed",
    "cancelled": "cancelled",
}


# ------------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _signed(value: Any, digits: int = 4) -> str:
    return f"{value:+.{digits}f}" if isinstance(value, int | float) else "-"


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _params(params: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={_param(v)}" for k, v in (params or {}).items())


def _label(trial: dict[str, Any]) -> str:
    """A search trial's number, or a baseline's name."""
    return str(trial.get("baseline") or trial["number"])


def _trials_table(
    trials: list[dict[str, Any]], best: int | None, title: str | None = None
) -> Table:
    """Search trials in the given order, then the baselines; a column per parameter."""
    search = [t for t in trials if not t.get("baseline")]
    baselines = [t for t in trials if t.get("baseline")]
    names: list[str] = []
    for trial in search:
        names += [p for p in trial.get("params") or {} if p not in names]
    table = Table(title=title, title_justify="left")
    table.add_column("trial")
    table.add_column("state")
    table.add_column("value", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for trial in [*search, *baselines]:
        value = _num(trial.get("value"))
        if trial.get("value") is None and trial.get("intermediate") is not None:
            value = f"({_num(trial['intermediate'])} @ {trial.get('last_step', '?')})"
        elif trial.get("spread") is not None:
            value += f" ± {_num(trial['spread'])}"
        mark = " ★" if trial["number"] == best and not trial.get("baseline") else ""
        params = {} if trial.get("baseline") else trial.get("params") or {}
        cells = [Text(_param(params[n])) if n in params else Text("") for n in names]
        table.add_row(Text(_label(trial) + mark), Text(str(trial.get("state", ""))), value, *cells)
    return table


def _verdict(verdict: dict[str, Any] | None) -> Group | Text:
    """The multi-task verdict: per task, the best trial against that task trained alone and
    against plain `sum` weighting; Δ_MTL, the mean relative gain over the single-task models."""
    if not verdict:
        return Text("no verdict (the study ended before its baselines ran)", style="dim")
    table = Table(
        title=f"multi-task verdict: {verdict['metric']} on {verdict['split']}",
        title_justify="left",
    )
    for col in ("task", "multi-task", "single-task", "difference", "sum"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, v in verdict["tasks"].items():
        diff = v.get("difference")
        style = "green" if (diff or 0) > 0 else "red" if (diff or 0) < 0 else ""
        table.add_row(
            task,
            _num(v.get("multi_task")),
            _num(v.get("single_task")),
            Text(_signed(diff), style=style),
            _num(v.get("sum")),
        )
    delta = verdict.get("delta_mtl")
    lines: list[RenderableType] = [table]
    if delta is None:
        lines.append(Text("Δ_MTL: -"))
    else:
        gist = "sharing helps" if delta > 0 else "sharing hurts" if delta < 0 else "no difference"
        lines.append(
            Text.assemble(
                "Δ_MTL: ",
                (f"{delta:+.2f} %", "bold green" if delta > 0 else "bold red" if delta < 0 else ""),
                f"  (mean relative gain over single-task models: {gist})",
            )
        )
    best, summed = verdict.get("objective_best"), verdict.get("objective_sum")
    if summed is not None:
        lines.append(
            Text(f"objective (validation): best {_num(best)}, plain sum {_num(summed)}", "dim")
        )
    return Group(*lines)


def _summary(study: dict[str, Any]) -> Text:
    name = f" ({study['name']})" if study.get("name") else ""
    line = Text.assemble(
        (study["id"], "bold"),
        name,
        "  ",
        (study["state"], "bold"),
        f"  trials {study['trials_done']}/{study['trials_planned']} done",
        f", {study['failures']} failed" if study.get("failures") else "",
    )
    if study.get("error"):
        line.append(f"\nerror: {study['error']}", style="red")
    if study.get("best_trial") is not None:
        line.append(
            f"\nbest: trial {study['best_trial']} = {_num(study.get('best_value'))}"
            f"  {_params(study.get('best_params'))}"
        )
    if study.get("model_job"):
        line.append(f"\nmodel: job {study['model_job']}")
    return line


def _importances(importances: dict[str, float] | None) -> Table | None:
    if not importances:
        return None
    table = Table("parameter", "importance", "", title="parameter importances")
    table.title_justify = "left"
    top = max(importances.values()) or 1.0
    for name, value in sorted(importances.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(name), _num(value, 3), "█" * max(1, round(20 * value / top)))
    return table


# ---------------------------------------------------------------------------------- follow


@dataclass
class _Following:
    """What the event stream has said so far about a study."""

    study_id: str
    planned: int
    state: str = "queued"
    error: str | None = None
    trials: dict[int, dict[str, Any]] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    final: str | None = None

    def take(self, event: StudyStreamEvent) -> None:
        d = event.data
        if event.type == "state":
            self.state = d.get("state", self.state)
            self.error = d.get("error") or self.error
        elif event.type == "trial" and isinstance(d.get("trial"), int):
            trial = self.trials.setdefault(d["trial"], {"number": d["trial"], "state": "running"})
            kind = d.get("event", "")
            trial["state"] = _TRIAL_STATE.get(kind, trial["state"])
            for key in ("params", "jobs", "baseline", "error"):
                if d.get(key) is not None:
                    trial[key] = d[key]
            if kind == "reported":
                trial["intermediate"], trial["last_step"] = d.get("value"), d.get("step")
            elif d.get("value") is not None:
                trial["value"] = d["value"]
        elif event.type == "best":
            self.best = d
        elif event.type == "end":
            self.final = d.get("state")

    def render(self) -> Table:
        search = [t for t in self.trials.values() if not t.get("baseline")]
        done = sum(t["state"] != "running" for t in search)
        title = f"{self.study_id}: {self.state} · {done}/{self.planned} trials done"
        best = self.best.get("trial") if self.best else None
        table = _trials_table(sorted(self.trials.values(), key=lambda t: t["number"]), best, title)
        if self.best:
            table.caption = (
                f"best so far: trial {self.best.get('trial')} = {_num(self.best.get('value'))}"
                f"  {_params(self.best.get('params'))}"
            )
            table.caption_justify = "left"
        table.min_width = max(len(title), len(table.caption or ""))  # no wrapped title
        return table


def _settled(client: JobClient, study_id: str, wait_s: float = 15.0) -> dict[str, Any]:
    """The study once its record says it is over. The stream's terminal `state` event can
    come a moment before the driver saves the record (and its verdict): wait for it."""
    deadline = time.monotonic() + wait_s
    while True:
        study = client.study(study_id)
        if study["state"] in STUDY_OVER or time.monotonic() > deadline:
            return study
        time.sleep(0.2)


def _follow(client: JobClient, study_id: str, planned: int) -> None:
    view = _Following(study_id, planned)
    try:
        with Live(view.render(), console=console, refresh_per_second=4) as live:
            for event in client.study_events(study_id):
                view.take(event)
                live.update(view.render())
        if not console.is_terminal:  # Live ends its last frame with a newline on a terminal only
            console.line()
        study = _settled(client, study_id)
    except ServiceError as exc:
        raise _fail(str(exc), 1) from None
    console.print(_verdict(study.get("verdict")))
    final = study["state"] if study["state"] in STUDY_OVER else view.state
    reason = f": {study['error']}" if study.get("error") else ""
    console.print(Text.assemble(f"study {study_id} ended: ", (final, "bold"), reason))
    if final != "succeeded":
        raise typer.Exit(1)


# -------------------------------------------------------------------------------- commands


def _read_body(path: Path) -> dict[str, Any]:
    """The study request in FILE (JSON for .json, else YAML: a superset of JSON)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(f"{path}: cannot read: {exc}") from None
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise _fail(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(raw, dict):
        raise _fail(f"{path}: the study must be a mapping at the top level")
    # YAML dates and the like as the strings they were written as
    body: dict[str, Any] = json.loads(json.dumps(raw, default=str))
    return body


@study_app.command("submit")
def submit_study(
    file: Annotated[Path, typer.Argument(help="YAML or JSON: the body of POST /v1/studies")],
    name: Annotated[str | None, typer.Option(help="a label for the study")] = None,
    follow: Annotated[
        bool, typer.Option(help="a live table of the trials until it ends, then the verdict")
    ] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Start a study: search the space in FILE, then compare with single-task models."""
    body = _read_body(file)
    if name is not None:
        body["name"] = name
    with _client(url, api_key) as client:
        study = _service(lambda: client.submit_study(body))
        console.print(
            f"submitted [bold]{study['id']}[/] ({study['state']}, "
            f"{study['trials_planned']} trials planned)"
        )
        if follow:
            _follow(client, study["id"], study["trials_planned"])


@study_app.command("status")
def study_status(
    study_id: Annotated[str, typer.Argument(help="study id")],
    as_json: Annotated[bool, typer.Option("--json", help="print the service's JSON")] = False,
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """A study's state, trials, best value and parameters, leaderboard and verdict."""
    with _client(url, api_key) as client:
        study = _service(lambda: client.study(study_id))
    if as_json:
        sys.stdout.write(json.dumps(study, indent=1) + "\n")
        return
    console.print(_summary(study))
    if study["trials"]:
        console.print(_trials_table(study["trials"], study.get("best_trial"), "leaderboard"))
    importances = _importances(study.get("importances"))
    if importances is not None:
        console.print(importances)
    if study["state"] in STUDY_OVER:
        console.print(_verdict(study.get("verdict")))


@study_app.command("cancel")
def cancel_study(
    study_id: Annotated[str, typer.Argument(help="study id")],
    url: UrlOption = DEFAULT_URL,
    api_key: KeyOption = None,
) -> None:
    """Cancel a study: its running trials are cancelled and no new one starts."""
    with _client(url, api_key) as client:
        out = _service(lambda: client.cancel_study(study_id))
    console.print(f"{study_id}: {out['state']}")
