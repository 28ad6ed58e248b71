"""Each modeling option of issue 12 alone, then the best combination, on the clothing reviews.

    python benchmarks/modeling_options.py [--train-rows 600 --val-rows 300 --test-rows 1000]
                                          [--seeds 0 1 2] [--only NAME ...] [--smoke]

Every variant starts from examples/womens_clothing.yaml (the README's config) trained on the
same stratified subsample of ../shared/data/womens_clothing_reviews (drawn like
benchmarks/study_clothing.py draws it), with `encoder.max_length` 64 (the only other change:
CPU time) and changes one thing:

* `depends_on`: sentiment reads department's predicted distribution (detached);
* `mlm`: an auxiliary MLM task, weight 0.5, on the training texts and the 7,634 unlabeled
  in-domain reviews of `unlabeled.csv`;
* `layer_decay`: 0.8 per layer (6 layers: the embeddings train at 0.26x encoder_lr);
* `ema`: an exponential moving average of the weights, decay 0.95 (the run has ~76 steps);
* `swa`: an equal average of the weights over the second half of training;
* `rdrop`: R-Drop on the heads, alpha 1.

Each runs with every seed (seeds interleaved: seed 0 of every variant, then seed 1, ...); the
table reports mean and spread (sample standard deviation) over the seeds of the test
macro-F1 per task and of their mean, and the validation objective. Then `combination`: every
option whose mean test macro-F1 beat the README config's, together (when none did, the two
best, labelled so). Last, `ensemble of the README seeds`: the README config's seed runs
averaged by `mtl.ensemble` (no training; a seed ensemble). Results: benchmarks/results/
modeling_options.json and .log; docs/training.md quotes them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.study_clothing import DATA, cpu_model, subsample  # noqa: E402
from mtl.config import TrainConfig, load_config  # noqa: E402

EXAMPLE = ROOT / "examples" / "womens_clothing.yaml"
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("department", "sentiment")

OPTIONS: dict[str, dict[str, Any]] = {
    "depends_on": {"tasks.sentiment.depends_on": ["department"]},
    "mlm": {"mlm": {"weight": 0.5, "data": "UNLABELED"}},
    "layer_decay": {"optimizer.layer_decay": 0.8},
    "ema": {"averaging": {"kind": "ema", "ema_decay": 0.95}},
    "swa": {"averaging": {"kind": "swa", "swa_start": 0.5}},
    "rdrop": {"rdrop": {"alpha": 1.0}},
}

_LOG: Any = None


def say(line: str = "") -> None:
    print(line, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


def apply(config: dict[str, Any], changes: dict[str, Any], unlabeled: str) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for path, value in changes.items():
        value = json.loads(json.dumps(value).replace('"UNLABELED"', json.dumps(unlabeled)))
        parts = path.split(".")
        target: Any = out
        for part in parts[:-1]:
            if isinstance(target, list):
                target = next(t for t in target if t["name"] == part)
            else:
                target = target.setdefault(part, {})
        if isinstance(target.get(parts[-1]), dict) and isinstance(value, dict):
            target[parts[-1]].update(value)
        else:
            target[parts[-1]] = value
    return out


def base_config(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(EXAMPLE).model_dump(mode="json")
    config["data"].update(
        train=str(folder / "train.csv"),
        validation=str(folder / "validation.csv"),
        test=str(folder / "test.csv"),
    )
    config["encoder"]["max_length"] = args.max_length
    config["log_every"] = 1000
    config["grad_conflict_every"] = 0  # sampling cosines costs time and changes no update
    config["device"] = "cpu"
    if args.smoke:
        config["encoder"]["random_init"] = {
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 128,
        }  # fmt: skip
        config["max_steps"] = 3
    return config


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    from mtl.trainer import train

    started = time.perf_counter()
    result = train(TrainConfig.model_validate(config), out, resume=False)
    wall = time.perf_counter() - started
    test = result.metrics["test"]["tasks"]
    val = result.metrics["validation"]
    return {
        "test": {t: test[t]["macro_f1"] for t in TASKS},
        "test_mean": statistics.fmean(test[t]["macro_f1"] for t in TASKS),
        "validation_mean": val["mean"]["macro_f1"] if val else None,
        "wall_s": round(wall, 1),
        "model_dir": str(result.model_dir),
    }


def ensemble_scores(model_dirs: list[str], test_csv: Path) -> dict[str, Any]:
    import csv

    import torch
    from torchmetrics.functional.classification import multiclass_f1_score

    from mtl.ensemble import export_ensemble
    from mtl.predict import Predictor

    folder = Path(tempfile.mkdtemp(prefix="ensemble-"))
    export_ensemble(folder / "model", [Path(d) for d in model_dirs])
    predictor = Predictor.load(folder / "model")
    with open(test_csv, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    predicted = predictor.predict([r["text"] for r in rows])
    scores: dict[str, float] = {}
    for task in TASKS:
        labels = predictor.labels[task]
        y = torch.tensor([labels.index(r[task]) for r in rows])
        p = torch.tensor([labels.index(x[task]["label"]) for x in predicted])
        scores[task] = float(multiclass_f1_score(p, y, num_classes=len(labels), average="macro"))
    return {"test": scores, "test_mean": statistics.fmean(scores.values())}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(values: list[float]) -> dict[str, float]:
        return {
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }

    out = {t: stat([r["test"][t] for r in runs]) for t in TASKS}
    out["mean"] = stat([r["test_mean"] for r in runs])
    vals = [r["validation_mean"] for r in runs if r.get("validation_mean") is not None]
    out["validation"] = stat(vals) if vals else None
    return out


def row(name: str, s: dict[str, Any], n: int, delta: float | None) -> str:
    def cell(x: dict[str, float]) -> str:
        return f"{x['mean']:.3f} ± {x['sd']:.3f}"

    val = cell(s["validation"]) if s.get("validation") else "-"
    d = "" if delta is None else f"{delta:+.3f}"
    return (
        f"| {name} | {n} | {cell(s['department'])} | {cell(s['sentiment'])} | "
        f"{cell(s['mean'])} | {d} | {val} |"
    )


def main() -> None:
    global _LOG
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--val-rows", type=int, default=300)
    parser.add_argument("--test-rows", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="options to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny random encoder, 3 steps")
    parser.add_argument("--json", type=Path, default=RESULTS / "modeling_options.json")
    args = parser.parse_args()
    if args.smoke:
        args.json = Path(tempfile.mkdtemp()) / "smoke.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    _LOG = open(args.json.with_suffix(".log"), "w", encoding="utf-8")  # noqa: SIM115

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="modeling-options-"))
    data = work / "data"
    data.mkdir()
    counts = {}
    for split, n in (("train", args.train_rows), ("validation", args.val_rows),
                     ("test", args.test_rows)):  # fmt: skip
        blob, counts[split] = subsample(split, n, 0)
        (data / f"{split}.csv").write_bytes(blob)
    unlabeled = str(DATA / "unlabeled.csv")
    base = base_config(data, args)
    options = {k: v for k, v in OPTIONS.items() if args.only is None or k in args.only}
    say(f"# modeling options on the clothing reviews ({cpu_model()}, {args.threads} threads)")
    say(f"subsample: train {args.train_rows}, validation {args.val_rows}, test {args.test_rows}"
        f" (stratified, seed 0); max_length {args.max_length}; epochs {base['epochs']};"
        f" seeds {args.seeds}")  # fmt: skip
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "threads": args.threads},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "subsample": counts,
        "variants": {},
    }
    variants: dict[str, dict[str, Any]] = {"README config": {}, **options}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    started = time.perf_counter()

    def train_all(names: list[str]) -> None:
        for seed in args.seeds:  # interleaved: every variant once per seed
            for name in names:
                config = apply(base, variants[name], unlabeled)
                config["seed"] = seed
                out = work / "runs" / f"{name.replace(' ', '_')}-{seed}"
                r = run(config, out)
                runs[name].append({"seed": seed, **r})
                say(f"  {name:<28} seed {seed}: test macro-F1 department "
                    f"{r['test']['department']:.4f}, sentiment {r['test']['sentiment']:.4f}, "
                    f"mean {r['test_mean']:.4f}; {r['wall_s']} s")  # fmt: skip

    train_all(list(variants))
    base_mean = summary(runs["README config"])["mean"]["mean"]
    gains = {n: summary(runs[n])["mean"]["mean"] - base_mean for n in options}
    helped = [n for n, g in sorted(gains.items(), key=lambda kv: -kv[1]) if g > 0]
    label = "combination (" + " + ".join(helped) + ")"
    chosen = helped
    if len(helped) < 2:
        chosen = sorted(gains, key=lambda n: -gains[n])[:2]
        label = "combination of the two best (" + " + ".join(chosen) + ")"
        if not helped:
            label += ", none helped alone"
    if len(chosen) >= 2:
        combined: dict[str, Any] = {}
        for n in chosen:
            combined.update(OPTIONS[n])
        if "ema" in chosen and "swa" in chosen:  # one averaging: the better one
            keep = "ema" if gains["ema"] >= gains["swa"] else "swa"
            combined["averaging"] = OPTIONS[keep]["averaging"]
        variants[label] = combined
        runs[label] = []
        train_all([label])

    ensemble: dict[str, Any] | None = None
    try:
        ensemble = ensemble_scores([r["model_dir"] for r in runs["README config"]],
                                   data / "test.csv")  # fmt: skip
    except ImportError as exc:
        say(f"(no ensemble row: {exc})")

    say()
    say("| variant | runs | department | sentiment | mean of the two | vs README | "
        "validation objective |")  # fmt: skip
    say("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, rs in runs.items():
        s = summary(rs)
        delta = None if name == "README config" else s["mean"]["mean"] - base_mean
        say(row(name, s, len(rs), delta))
        results["variants"][name] = {"changes": variants[name], "runs": rs, "summary": s}
    if ensemble is not None:
        e = ensemble["test"]
        say(
            f"| ensemble of the README seeds ({len(args.seeds)} models) | 1 | "
            f"{e['department']:.3f} | {e['sentiment']:.3f} | {ensemble['test_mean']:.3f} | "
            f"{ensemble['test_mean'] - base_mean:+.3f} | - |"
        )
        results["ensemble"] = ensemble
    results["wall_s"] = round(time.perf_counter() - started, 1)
    say(f"\ntotal {results['wall_s']} s")
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
