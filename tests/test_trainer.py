"""The training loop end to end on tiny models: learning, every strategy, stop/early stopping,
non-finite losses, text data from files, per-task options and freezing."""

from __future__ import annotations

import copy
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.checkpoint import Checkpointer
from mtl.errors import TrainingError
from mtl.pipeline import Batch
from mtl.trainer import Trainer, TrainResult, train

pytestmark = pytest.mark.usefixtures("one_thread")

CHANCE = {"task_a": 1 / 5, "task_b": 1 / 3}


class Recorder(Callback):
    """Records logs (with the epoch they fell in), evaluations and the outcome."""

    def __init__(self) -> None:
        self.logs: dict[int, dict[str, Any]] = {}
        self.log_epochs: dict[int, int] = {}
        self.evals: dict[int, dict[str, Any]] = {}
        self.checkpoints: list[int] = []
        self.outcome: str | None = None

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        self.logs[state.step] = copy.deepcopy(metrics)
        self.log_epochs[state.step] = state.epoch

    def on_evaluate(
        self, state: TrainState, metrics: dict[str, Any], control: TrainControl
    ) -> None:
        self.evals[state.step] = copy.deepcopy(metrics)

    def on_checkpoint(self, state: TrainState, path: Path, control: TrainControl) -> None:
        self.checkpoints.append(state.step)

    def on_train_end(self, state: TrainState, outcome: str, control: TrainControl) -> None:
        self.outcome = outcome


class StopAt(Callback):
    def __init__(self, step: int, reason: str = "cancelled", checkpoint: bool = False) -> None:
        self.step, self.reason, self.checkpoint = step, reason, checkpoint

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        if state.step == self.step:
            if self.checkpoint:
                control.should_checkpoint = True
            control.stop(self.reason)


def val_accuracy(result: TrainResult) -> dict[str, float]:
    return {t: m["accuracy"] for t, m in result.metrics["validation"]["tasks"].items()}


def params(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------ learning


def test_learnable_two_task_run_reaches_90_percent_on_both_tasks(
    make_config: Any, tmp_path: Path
) -> None:
    config = make_config(data={"num_samples": 512}, epochs=3)
    rec = Recorder()
    result = train(config, tmp_path, callbacks=[rec])
    assert result.outcome == "completed"
    assert result.state.step == 3 * 16
    acc = val_accuracy(result)
    assert acc["task_a"] > 0.9 and acc["task_b"] > 0.9, acc
    assert result.metrics["validation"]["tasks"]["task_a"]["n"] == 128
    # validation once per epoch, a checkpoint at each, the model exported
    assert sorted(rec.evals) == [16, 32, 48] and rec.checkpoints == [16, 32, 48]
    assert result.model_dir == tmp_path / "model" and (tmp_path / "model" / "mtl.json").is_file()
    assert (tmp_path / "metrics.json").is_file()
    # the training loss went down
    first, last = rec.logs[1]["loss"], rec.logs[48]["loss"]
    assert last < 0.5 * first


# ---------------------------------------------------------------------------------- strategies

STRATEGIES: dict[str, dict[str, Any]] = {
    "sum": {"weighting": {"name": "sum"}},
    "static_weights": {"weighting": {"name": "static", "weights": {"task_a": 1.5, "task_b": 0.5}}},
    "static_alpha": {"weighting": {"name": "static", "alpha": 0.7}},
    "uncertainty": {"weighting": {"name": "uncertainty"}},
    "dwa": {"weighting": {"name": "dwa", "temperature": 2.0}, "epochs": 3},
    "rlw": {"weighting": {"name": "rlw"}},
    "gradnorm": {"weighting": {"name": "gradnorm"}},
    "famo": {"weighting": {"name": "famo"}},
    "pcgrad": {"gradient": {"name": "pcgrad"}},
    "mgda": {"gradient": {"name": "mgda"}},
    "pcgrad_parameters": {"gradient": {"name": "pcgrad", "level": "parameters"}},
    "mgda_parameters": {"gradient": {"name": "mgda", "level": "parameters"}},
    "upgrad": {"gradient": {"name": "upgrad"}},
    "upgrad_parameters": {"gradient": {"name": "upgrad", "level": "parameters"}},
}
COSINE_EVERY = 3


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_learns_and_logs_weights_and_cosines(
    name: str, make_config: Any, tmp_path: Path
) -> None:
    config = make_config(grad_conflict_every=COSINE_EVERY, **STRATEGIES[name])
    rec = Recorder()
    result = train(config, tmp_path, callbacks=[rec])
    assert result.outcome == "completed"

    # it learns: 256 samples x 2 epochs; chance is 0.2 (task_a) and 0.33 (task_b)
    acc = val_accuracy(result)
    assert sum(acc.values()) / 2 > 0.7, acc
    for task, a in acc.items():
        assert a > CHANCE[task] + 0.3, (task, acc)

    steps = result.state.step
    assert sorted(rec.logs) == list(range(1, steps + 1))  # log_every=1
    for step, log in rec.logs.items():
        assert set(log["weights"]) == {"task_a", "task_b"}
        assert all(math.isfinite(w) for w in log["weights"].values())
        assert set(log["tasks"]) == {"task_a", "task_b"}
        assert all(
            math.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1 for m in log["tasks"].values()
        )
        assert log["lr"] == pytest.approx(3e-3)
        # the task-gradient cosine is sampled every COSINE_EVERY steps, and only then
        if step % COSINE_EVERY == 0:
            assert set(log["grad_cosine"]) == {"task_a|task_b"}, step
            assert -1.0 <= log["grad_cosine"]["task_a|task_b"] <= 1.0
        else:
            assert "grad_cosine" not in log, step

    weights = [rec.logs[s]["weights"] for s in sorted(rec.logs)]
    wname = config.weighting.name
    if wname == "sum":
        assert all(w == {"task_a": 1.0, "task_b": 1.0} for w in weights)
    elif wname == "static" and config.weighting.alpha is None:
        assert all(w == {"task_a": 1.5, "task_b": 0.5} for w in weights)
    elif wname == "static":
        assert all(w == pytest.approx({"task_a": 0.7, "task_b": 0.3}) for w in weights)
    elif wname == "uncertainty":
        # 0.5 * exp(-s) with s learned from 0
        assert all(w > 0 for w in weights[-1].values())
        assert any(abs(w - 0.5) > 1e-3 for w in weights[-1].values()), weights[-1]
    elif wname == "dwa":
        for step, w in zip(sorted(rec.logs), weights, strict=True):
            if rec.log_epochs[step] < 2:
                assert w == {"task_a": 1.0, "task_b": 1.0}, step
            else:  # from the third epoch: 2 * softmax(loss ratios / T)
                assert sum(w.values()) == pytest.approx(2.0)
                assert w["task_a"] != w["task_b"]
        assert rec.log_epochs[max(rec.logs)] == 2
    elif wname == "rlw":
        assert all(sum(w.values()) == pytest.approx(2.0, abs=1e-5) for w in weights)
        assert all(min(w.values()) > 0 for w in weights)
        assert len({round(w["task_a"], 6) for w in weights}) > len(weights) // 2  # random draws
    elif wname == "gradnorm":
        assert all(sum(w.values()) == pytest.approx(2.0, abs=1e-6) for w in weights)
        assert abs(weights[-1]["task_a"] - 1.0) > 1e-3
    elif wname == "famo":  # c * z_t / L_t: they sum to 1 and follow the losses
        assert all(sum(w.values()) == pytest.approx(1.0, abs=1e-5) for w in weights)
        assert len({round(w["task_a"], 6) for w in weights}) > len(weights) // 2


# ------------------------------------------------------------- gradient surgery changes the update

#: Plain SGD at lr 1, no clipping, no dropout: the encoder update of one step is exactly minus
#: the combined gradient.
SURGERY_LR = 1.0


def conflict_trainer(make_config: Any, tmp_path: Path, gradient: dict[str, str]) -> Trainer:
    head = {"dropout": 0.0}
    config = make_config(
        tasks=[
            {"name": "task_a", "num_classes": 2, "head": head},
            {"name": "task_b", "num_classes": 2, "head": head},
        ],
        encoder={"random_init": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
        gradient=gradient,
        optimizer={"name": "sgd", "lr": SURGERY_LR, "momentum": 0.0},
        grad_clip=None,
    )
    trainer = Trainer(config, tmp_path / f"{gradient['name']}-{len(list(tmp_path.iterdir()))}")
    # the two heads start equal, so the tasks pull the shared encoder against each other
    with torch.no_grad():
        head_a, head_b = trainer.model.heads["task_a"], trainer.model.heads["task_b"]
        for p_b, p_a in zip(head_b.parameters(), head_a.parameters(), strict=True):
            p_b.copy_(p_a)
    return trainer


def conflicting_batch(trainer: Trainer) -> Batch:
    """The first training batch, relabelled: task_a says class 0 on every row, task_b class 1
    on three rows of four (and 0 on the rest)."""
    first = trainer.data.epoch_plan(0)[0]
    rows = first.input_ids.shape[0]
    y_a = torch.zeros(rows, dtype=torch.long)
    y_b = (torch.arange(rows) % 4 != 0).long()
    labels = {"task_a": y_a, "task_b": y_b}
    return Batch(first.input_ids, first.attention_mask, labels, ["task_a", "task_b"], {})


def task_gradients(trainer: Trainer, batch: Batch, level: str) -> torch.Tensor:
    """[2, D] float64: d L_t / d pooled (representation) or d L_t / d encoder (parameters)."""
    pooled = trainer.model.encoder(batch.input_ids, batch.attention_mask)
    logits = trainer.model.forward_heads(pooled)
    grads = []
    for task in ("task_a", "task_b"):
        loss = F.cross_entropy(logits[task], batch.labels[task])
        wrt = [pooled] if level == "representation" else trainer.shared_params
        parts = torch.autograd.grad(loss, wrt, retain_graph=True)
        grads.append(torch.cat([g.flatten() for g in parts]).double())
    return torch.stack(grads)


def combine_by_hand(name: str, g: torch.Tensor) -> torch.Tensor:
    """Two-task PCGrad and MGDA in closed form (float64), independent of mtl.strategies."""
    g_a, g_b = g[0], g[1]
    dot = torch.dot(g_a, g_b)
    if name == "none":
        return g_a + g_b
    if name == "pcgrad":  # each projected onto the normal plane of the other (dot < 0 here)
        return (g_a - dot / g_b.dot(g_b) * g_b) + (g_b - dot / g_a.dot(g_a) * g_a)
    assert name == "mgda"  # 2 * the min-norm point of the segment [g_a, g_b]
    a = ((g_b.dot(g_b) - dot) / (g_a - g_b).dot(g_a - g_b)).clamp(0.0, 1.0)
    return 2 * (a * g_a + (1 - a) * g_b)


def encoder_update(trainer: Trainer, batch: Batch) -> torch.Tensor:
    """One optimizer step of the trainer on `batch`: the change of the shared encoder."""
    before = torch.cat([p.detach().flatten().clone() for p in trainer.shared_params])
    trainer._optimizer_step([batch], TrainState(total_steps=1, steps_per_epoch=1))
    after = torch.cat([p.detach().flatten() for p in trainer.shared_params])
    return (after - before).double()


def expected_update(trainer: Trainer, batch: Batch, name: str, level: str) -> torch.Tensor:
    """-lr * the combined task gradient, pulled back through the encoder at the representation
    level."""
    combined = combine_by_hand(name, task_gradients(trainer, batch, level))
    if level == "parameters":
        return -SURGERY_LR * combined
    pooled = trainer.model.encoder(batch.input_ids, batch.attention_mask)
    parts = torch.autograd.grad(
        pooled, trainer.shared_params, combined.float().view_as(pooled), allow_unused=True
    )
    flat = [
        (g if g is not None else torch.zeros_like(p)).flatten()
        for g, p in zip(parts, trainer.shared_params, strict=True)
    ]
    return -SURGERY_LR * torch.cat(flat).double()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_sum_update_is_repeatable_and_the_plain_sum_of_task_gradients(
    make_config: Any, tmp_path: Path
) -> None:
    first = conflict_trainer(make_config, tmp_path, {"name": "none"})
    second = conflict_trainer(make_config, tmp_path, {"name": "none"})
    batch = conflicting_batch(first)
    expected = expected_update(first, batch, "none", "parameters")
    update = encoder_update(first, batch)
    assert float(update.norm()) > 1.0  # a real step (the gradients have norms of ~8)
    # the same seed and batch give bit-identical updates: any difference below is the strategy
    assert torch.equal(encoder_update(second, batch), update)
    assert relative(update, expected) < 1e-4


@pytest.mark.parametrize("level", ["representation", "parameters"])
@pytest.mark.parametrize("name", ["pcgrad", "mgda"])
def test_gradient_surgery_changes_the_shared_encoder_update(
    name: str, level: str, make_config: Any, tmp_path: Path
) -> None:
    plain = conflict_trainer(make_config, tmp_path, {"name": "none"})
    surgery = conflict_trainer(make_config, tmp_path, {"name": name, "level": level})
    batch = conflicting_batch(plain)
    weights = {k: v.clone() for k, v in plain.model.state_dict().items()}
    assert all(torch.equal(v, weights[k]) for k, v in surgery.model.state_dict().items())

    # the precondition: the task gradients conflict at the level the strategy works on
    g = task_gradients(surgery, batch, level)
    cosine = float(F.cosine_similarity(g[0], g[1], dim=0))
    assert cosine < -0.3, cosine

    expected = expected_update(surgery, batch, name, level)
    sum_update = encoder_update(plain, batch)
    update = encoder_update(surgery, batch)
    # the strategy's update, not the sum's: far above float noise (sum vs sum is exact)
    assert relative(update, sum_update) > 0.1, relative(update, sum_update)
    assert relative(update, expected) < 1e-4, relative(update, expected)


# --------------------------------------------------------------------------- stopping the run


def test_a_callback_stop_leaves_a_stopped_run_with_its_checkpoint(
    make_config: Any, tmp_path: Path
) -> None:
    rec = Recorder()
    result = train(make_config(), tmp_path, callbacks=[rec, StopAt(11, "cancelled")])
    assert result.outcome == "stopped" and rec.outcome == "stopped"
    assert result.state.step == 11
    assert result.state.stop_reason == "cancelled"
    assert result.model_dir is None and result.metrics == {}
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    # nothing ran after the stop; the end-of-epoch checkpoint is there to resume from
    assert max(rec.logs) == 11
    latest = Checkpointer(tmp_path / "checkpoints").latest()
    assert latest is not None and latest.name == "step-00000008"


def test_a_stop_with_checkpoint_every_checkpoints_the_stop_step(
    make_config: Any, tmp_path: Path
) -> None:
    result = train(make_config(checkpoint_every=3), tmp_path, callbacks=[StopAt(6)])
    assert result.outcome == "stopped" and result.state.step == 6
    latest = Checkpointer(tmp_path / "checkpoints").latest()
    assert latest is not None and latest.name == "step-00000006"


def test_should_checkpoint_with_stop_in_on_step_end_saves_that_step(
    make_config: Any, tmp_path: Path
) -> None:
    result = train(make_config(), tmp_path, callbacks=[StopAt(3, checkpoint=True)])
    assert result.outcome == "stopped" and result.state.step == 3
    latest = Checkpointer(tmp_path / "checkpoints").latest()
    assert latest is not None and latest.name == "step-00000003"


class RefuseSaves(Callback):
    """Lets the first `allowed` saves through, then refuses (a lost lease, say)."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.asked: list[int] = []

    def on_save(self, state: TrainState, control: TrainControl) -> None:
        self.asked.append(state.step)
        if len(self.asked) > self.allowed:
            control.allow_save = False
            control.stop("not ours any more")


@pytest.mark.parametrize("allowed", [1, 2])
def test_a_refused_save_writes_nothing_and_stops_the_run(
    make_config: Any, tmp_path: Path, allowed: int
) -> None:
    """`on_save` comes before every checkpoint and before the export; a refusal writes
    nothing (allowed=1: the second checkpoint; allowed=2: the final export) and stops."""
    refuse = RefuseSaves(allowed)
    result = train(make_config(checkpoint_every=4, max_steps=8), tmp_path, callbacks=[refuse])
    assert result.outcome == "stopped" and result.state.stop_reason == "not ours any more"
    assert result.model_dir is None
    assert not (tmp_path / "model").exists() and not (tmp_path / "metrics.json").exists()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    if allowed == 1:
        assert refuse.asked == [4, 8] and result.state.step == 8
        assert names == ["step-00000004"]
    else:
        assert refuse.asked == [4, 8, 8] and names == ["step-00000008"]


def test_early_stopping_completes_and_exports_the_best_model(
    make_config: Any, tmp_path: Path
) -> None:
    # min_delta is unreachable, so the second evaluation is never an improvement: patience 1
    # stops the run there, deterministically.
    config = make_config(
        epochs=5, monitor="mean/accuracy", early_stopping={"patience": 1, "min_delta": 1e9}
    )
    rec = Recorder()
    result = train(config, tmp_path, callbacks=[rec])
    assert result.outcome == "completed" and rec.outcome == "completed"
    assert result.state.step == 16 and result.state.epoch == 2
    assert result.state.stop_reason is not None
    assert result.state.stop_reason.startswith("early stopping: mean/accuracy did not improve")
    assert result.state.best_step == 8
    assert sorted(rec.evals) == [8, 16]
    assert rec.evals[8]["monitor"]["best"] is True and rec.evals[16]["monitor"]["best"] is False
    assert result.model_dir is not None and (result.model_dir / "mtl.json").is_file()
    # the exported model is the best one (step 8): its validation metrics are step 8's
    best = rec.evals[8]["tasks"]
    for task, m in result.metrics["validation"]["tasks"].items():
        assert m["accuracy"] == pytest.approx(best[task]["accuracy"])
        assert m["loss"] == pytest.approx(best[task]["loss"], rel=1e-5)


def test_max_batches_stops_after_one_batch(make_config: Any, tmp_path: Path) -> None:
    rec = Recorder()
    result = train(make_config(), tmp_path, callbacks=[rec], max_batches=1)
    assert result.outcome == "completed" and result.state.step == 1


# --------------------------------------------------------------------------- non-finite losses


class PoisonHead(Callback):
    """At the end of step `step`, fill task_a's head weight with NaN; with `restore`, put the
    weight back one step later (so exactly one step sees a NaN loss)."""

    def __init__(self, trainer: Trainer, step: int, restore: bool) -> None:
        self.trainer, self.step, self.restore = trainer, step, restore
        self.saved: torch.Tensor | None = None
        self.encoder_at: dict[int, torch.Tensor] = {}
        self.skipped_at: dict[int, int] = {}

    def _weight(self) -> torch.Tensor:
        head: Any = self.trainer.model.heads["task_a"]
        return head[1].weight

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        transformer: Any = self.trainer.model.encoder.transformer
        emb = transformer.embeddings.word_embeddings.weight
        self.encoder_at[state.step] = emb.detach().clone()
        self.skipped_at[state.step] = state.skipped_steps
        with torch.no_grad():
            if state.step == self.step:
                self.saved = self._weight().detach().clone()
                self._weight().fill_(float("nan"))
            elif state.step == self.step + 1 and self.restore:
                assert self.saved is not None
                self._weight().copy_(self.saved)


def test_a_nan_loss_fails_the_run_with_a_training_error(make_config: Any, tmp_path: Path) -> None:
    trainer = Trainer(make_config(), tmp_path, callbacks=[])
    rec = Recorder()
    trainer.callbacks.callbacks += [PoisonHead(trainer, 3, restore=False), rec]
    with pytest.raises(TrainingError, match=r"non-finite \(NaN or inf\) at step 4"):
        trainer.fit()
    assert rec.outcome == "failed"
    assert max(rec.logs) == 3
    assert not (tmp_path / "model").exists()


def test_nonfinite_skip_skips_one_bad_step_and_goes_on(make_config: Any, tmp_path: Path) -> None:
    trainer = Trainer(make_config(nonfinite_loss="skip"), tmp_path)
    poison = PoisonHead(trainer, 3, restore=True)
    rec = Recorder()
    trainer.callbacks.callbacks += [poison, rec]
    result = trainer.fit()
    assert result.outcome == "completed" and result.state.step == 16
    assert poison.skipped_at[4] == 1  # step 4 saw the NaN and was skipped
    assert poison.skipped_at[5] == 0 and result.state.skipped_steps == 0
    # the skipped step left the weights alone; the next one trained
    assert torch.equal(poison.encoder_at[4], poison.encoder_at[3])
    assert not torch.equal(poison.encoder_at[5], poison.encoder_at[4])
    assert "task_a" not in rec.logs[4]["tasks"]  # nothing counted from the NaN step
    assert all(math.isfinite(rec.logs[s]["loss"]) for s in rec.logs if s != 4)
    assert val_accuracy(result)["task_a"] > 0.5
    # the skip is reported: every log from step 4 on counts it (a total, not in a row)
    assert [rec.logs[s]["skipped_steps"] for s in sorted(rec.logs)] == [0] * 3 + [1] * 13
    assert result.state.skipped_total == 1


def test_nonfinite_skip_gives_up_after_ten_in_a_row(make_config: Any, tmp_path: Path) -> None:
    trainer = Trainer(make_config(nonfinite_loss="skip"), tmp_path)
    trainer.callbacks.callbacks.append(PoisonHead(trainer, 1, restore=False))
    with pytest.raises(TrainingError, match=r"non-finite.* 11 times"):
        trainer.fit()


# --------------------------------------------------------------------------------- text data


def text_config(make_config: Any, data: dict[str, Any], **overrides: Any) -> Any:
    tasks = [{"name": "sentiment", "num_classes": 3}, {"name": "topic", "num_classes": 2}]
    base: dict[str, Any] = {
        "tasks": tasks,
        "data": data,
        "batch_size": 8,
        "epochs": 1,
        "monitor": "mean/accuracy",
    }
    base.update(overrides)
    return make_config(**base)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_files_train_both_tasks(
    suffix: str, make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    path = write_rows(tmp_path / f"train{suffix}", labelled_rows(48, missing_topic_row=5))
    config = text_config(
        make_config, {"kind": "files", "train": str(path), "validation_fraction": 0.25}
    )
    rec = Recorder()
    result = train(config, tmp_path / "run", callbacks=[rec])
    assert result.outcome == "completed"
    assert result.state.step == 5  # 36 training rows / 8
    assert {"sentiment", "topic"} <= set().union(*(log["tasks"] for log in rec.logs.values()))
    val = result.metrics["validation"]["tasks"]
    assert val["sentiment"]["n"] == 12
    assert val["topic"]["n"] in (11, 12)  # one row has no topic label
    assert val["sentiment"]["labels"] == ["neg", "neu", "pos"]
    assert val["topic"]["labels"] == ["politics", "sport"]


def _two_sources(write_rows: Any, labelled_rows: Any, tmp_path: Path) -> dict[str, Any]:
    rows = labelled_rows(40)
    a = write_rows(
        tmp_path / "a.csv", [{"text": r["text"], "sentiment": r["sentiment"]} for r in rows]
    )
    b = write_rows(
        tmp_path / "b.jsonl", [{"body": r["text"], "topic": r["topic"]} for r in rows[:16]]
    )
    return {"a": str(a), "b": str(b)}


@pytest.mark.parametrize(
    ("sampling", "steps_per_epoch"), [("proportional", 7), ("round_robin", 10), ("temperature", 7)]
)
def test_separate_datasets_per_task_with_each_sampling(
    sampling: str,
    steps_per_epoch: int,
    make_config: Any,
    write_rows: Any,
    labelled_rows: Any,
    tmp_path: Path,
) -> None:
    files = _two_sources(write_rows, labelled_rows, tmp_path)
    tasks = [
        {"name": "sentiment", "num_classes": 3, "data": {"train": files["a"]}},
        {
            "name": "topic",
            "num_classes": 2,
            "data": {"train": files["b"], "text_column": "body"},
        },
    ]
    # the main data block serves no task: its (missing) file is never read
    data = {"kind": "files", "train": str(tmp_path / "unused.csv"), "sampling": sampling}
    config = text_config(make_config, data, tasks=tasks)
    rec = Recorder()
    result = train(config, tmp_path / "run", callbacks=[rec])
    assert result.outcome == "completed"
    assert result.state.step == steps_per_epoch  # a: 5 batches of 8, b: 2
    seen = [tuple(sorted(rec.logs[s]["tasks"])) for s in sorted(rec.logs)]
    assert set(seen) == {("sentiment",), ("topic",)}  # each batch comes from one source
    counts = Counter(seen)
    if sampling == "proportional":
        assert counts == {("sentiment",): 5, ("topic",): 2}
    elif sampling == "round_robin":
        assert seen == [("sentiment",), ("topic",)] * 5
    else:
        assert counts[("sentiment",)] + counts[("topic",)] == 7


def test_balanced_class_weights_and_label_smoothing_change_the_loss(
    make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    rows = labelled_rows(48)
    for r in rows[:30]:
        r["sentiment"] = "pos"  # imbalanced: balanced weights differ from 1
    path = write_rows(tmp_path / "train.csv", rows)
    data = {"kind": "files", "train": str(path)}

    def first_loss(**task_options: Any) -> float:
        tasks = [
            {"name": "sentiment", "num_classes": 3, **task_options},
            {"name": "topic", "num_classes": 2},
        ]
        rec = Recorder()
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        train(text_config(make_config, data, tasks=tasks, max_steps=2), out, callbacks=[rec])
        loss = rec.logs[1]["tasks"]["sentiment"]["loss"]
        assert math.isfinite(loss) and math.isfinite(rec.logs[2]["tasks"]["sentiment"]["loss"])
        return loss

    plain = first_loss()
    balanced = first_loss(class_weights="balanced")
    smoothed = first_loss(label_smoothing=0.5)
    assert balanced != pytest.approx(plain, rel=1e-4)
    assert smoothed != pytest.approx(plain, rel=1e-4)


def test_per_task_lr_and_grad_clip(make_config: Any, tmp_path: Path) -> None:
    tasks = [
        {"name": "task_a", "num_classes": 5, "lr": 2.0},
        {"name": "task_b", "num_classes": 3, "lr": 2.0, "grad_clip": 1e-3},
    ]
    config = make_config(
        tasks=tasks,
        optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0},
        grad_clip=None,
        max_steps=1,
    )
    trainer = Trainer(config, tmp_path)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"encoder": 0.5, "task_a": 2.0, "task_b": 2.0}
    before_a = params(trainer.model.heads["task_a"])
    before_b = params(trainer.model.heads["task_b"])
    result = trainer.fit()
    assert result.state.step == 1

    def moved(before: dict[str, torch.Tensor], head: str) -> float:
        after = params(trainer.model.heads[head])
        return float(torch.cat([(after[k] - before[k]).flatten() for k in before]).norm())

    # one SGD step of lr 2 on a gradient clipped to norm 1e-3 moves the head by <= 2e-3
    assert moved(before_b, "task_b") <= 2e-3 * (1 + 1e-4)
    assert moved(before_b, "task_b") > 0
    assert moved(before_a, "task_a") > 10 * 2e-3


def test_freeze_leaves_the_encoder_unchanged(make_config: Any, tmp_path: Path) -> None:
    trainer = Trainer(make_config(encoder={"freeze": True}, epochs=1), tmp_path)
    enc_before = params(trainer.model.encoder)
    assert enc_before  # the encoder has parameters (frozen ones included)
    heads_before = params(trainer.model.heads)
    trainer.fit()
    enc_after = params(trainer.model.encoder)
    assert all(torch.equal(enc_after[k], enc_before[k]) for k in enc_before)
    heads_after = params(trainer.model.heads)
    assert not all(torch.equal(heads_after[k], heads_before[k]) for k in heads_before)


def test_freeze_layers_leaves_embeddings_and_lower_layers_unchanged(
    make_config: Any, tmp_path: Path
) -> None:
    config = make_config(
        encoder={"freeze_layers": 1, "random_init": {"num_hidden_layers": 2}}, epochs=1
    )
    trainer = Trainer(config, tmp_path)
    before = params(trainer.model.encoder.transformer)
    trainer.fit()
    after = params(trainer.model.encoder.transformer)
    groups: dict[str, list[bool]] = {
        "embeddings.": [],
        "encoder.layer.0.": [],
        "encoder.layer.1.": [],
    }
    for name in before:
        for prefix in groups:
            if name.startswith(prefix):
                groups[prefix].append(torch.equal(before[name], after[name]))
    assert all(groups["embeddings."]) and groups["embeddings."]
    assert all(groups["encoder.layer.0."]) and groups["encoder.layer.0."]
    assert groups["encoder.layer.1."] and not any(groups["encoder.layer.1."])


def test_freeze_with_parameter_level_surgery_runs(make_config: Any, tmp_path: Path) -> None:
    config = make_config(
        encoder={"freeze": True}, gradient={"name": "pcgrad", "level": "parameters"}, max_steps=2
    )
    result = train(config, tmp_path)
    assert result.outcome == "completed" and result.state.step == 2
