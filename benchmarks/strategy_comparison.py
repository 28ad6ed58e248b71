"""Train the real-data example once per strategy and compare them on the test split.

    python benchmarks/strategy_comparison.py [--data-dir DIR] [--model PATH] [--out FILE]
                                             [--only NAME ...] [--smoke]

Every variant starts from examples/womens_clothing.yaml (sum of the losses, balanced class
weights on sentiment) and changes one thing: the weighting
strategy, the gradient strategy, the class weights, or the set of tasks (single-task runs
measure interference). For each run it records test accuracy and macro-F1 per task, the best
validation score, the mean and share-of-negative task-gradient cosines (the conflict
indicator), and time per step. Results go to a JSON file and a Markdown table on stdout
(the tables in docs/training.md come from here). On a CPU a full run takes hours; `--smoke`
runs every variant for a few steps on a tiny random encoder to check the plumbing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.callbacks import Callback, TrainControl, TrainState  # noqa: E402
from mtl.config import load_config  # noqa: E402
from mtl.trainer import train  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "sum (the example: class weights on sentiment)": {},
    "sum, no class weights": {"tasks": "no_class_weights"},
    "sum, class weights on both tasks": {"tasks": "both_class_weights"},
    "static 0.3/0.7": {"weighting": {"name": "static", "alpha": 0.3}},
    "uncertainty": {"weighting": {"name": "uncertainty"}},
    "dwa": {"weighting": {"name": "dwa", "temperature": 2.0}},
    "rlw": {"weighting": {"name": "rlw"}},
    "gradnorm": {"weighting": {"name": "gradnorm", "alpha": 1.5}},
    "pcgrad (representation)": {"gradient": {"name": "pcgrad", "level": "representation"}},
    "mgda (representation)": {"gradient": {"name": "mgda", "level": "representation"}},
    "pcgrad (parameters)": {"gradient": {"name": "pcgrad", "level": "parameters"}},
    "department only": {"tasks": "department"},
    "sentiment only": {"tasks": "sentiment"},
}


class Recorder(Callback):
    def __init__(self) -> None:
        self.cosines: list[float] = []
        self.weights: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self._last: tuple[int, float] | None = None

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        self.cosines += list(metrics.get("grad_cosine", {}).values())
        self.weights.append(metrics["weights"])
        now = time.perf_counter()
        if self._last is not None and state.step > self._last[0]:
            self.step_times.append((now - self._last[1]) / (state.step - self._last[0]))
        self._last = (state.step, now)


def build(variant: dict[str, Any], args: argparse.Namespace) -> Any:
    raw = load_config(ROOT / "examples" / "womens_clothing.yaml").model_dump()
    data_dir = Path(args.data_dir).resolve()
    for split in ("train", "validation", "test"):
        raw["data"][split] = str(data_dir / f"{split}.csv")
    if args.model:
        raw["encoder"]["model"] = args.model
    for key in ("weighting", "gradient"):
        if key in variant:
            raw[key] = variant[key]
    tasks = variant.get("tasks")
    if tasks == "no_class_weights":
        for t in raw["tasks"]:
            t["class_weights"] = None
    elif tasks == "both_class_weights":
        for t in raw["tasks"]:
            t["class_weights"] = "balanced"
    elif tasks is not None:
        raw["tasks"] = [t for t in raw["tasks"] if t["name"] == tasks]
    if args.smoke:
        raw["encoder"]["random_init"] = {
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 30522,
            "max_position_embeddings": 128,
        }
        raw["max_steps"] = 6
        raw["log_every"] = 2
        raw["grad_conflict_every"] = 2
        raw["eval_batch_size"] = 256
    if args.epochs:
        raw["epochs"] = args.epochs
    return load_config(raw)


def run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    config = build(VARIANTS[name], args)
    recorder = Recorder()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(config, Path(tmp), callbacks=[recorder], resume=False)
    wall = time.perf_counter() - started
    test = result.metrics["test"]["tasks"]
    cos = recorder.cosines
    return {
        "variant": name,
        "test": {
            t: {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]} for t, m in test.items()
        },
        "best_validation": result.state.best_metric,
        "best_step": result.state.best_step,
        "steps": result.state.step,
        "cosine_mean": statistics.fmean(cos) if cos else None,
        "cosine_negative_share": (sum(c < 0 for c in cos) / len(cos)) if cos else None,
        "final_weights": recorder.weights[-1] if recorder.weights else None,
        "step_time_ms": 1000 * statistics.median(recorder.step_times)
        if recorder.step_times
        else None,
        "wall_s": wall,
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| variant | dept acc | dept macro-F1 | sent acc | sent macro-F1 | grad cos (mean, <0) "
        "| step ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d = r["test"].get("department", {})
        s = r["test"].get("sentiment", {})

        def f(x: Any) -> str:
            return f"{x:.3f}" if isinstance(x, float) else "-"

        cos = (
            f"{r['cosine_mean']:.3f}, {r['cosine_negative_share']:.0%}"
            if r["cosine_mean"] is not None
            else "-"
        )
        out.append(
            f"| {r['variant']} | {f(d.get('accuracy'))} | {f(d.get('macro_f1'))} "
            f"| {f(s.get('accuracy'))} | {f(s.get('macro_f1'))} | {cos} "
            f"| {f(r['step_time_ms'])} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared/data/womens_clothing_reviews")
    )
    parser.add_argument("--model", default=None, help="encoder path (default: bundled MiniLM)")
    parser.add_argument("--out", default="strategy_comparison.json")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder, 6 steps")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    rows = []
    for name in names:
        row = run(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
