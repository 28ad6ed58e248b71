"""The modeling options a search can switch on (all off by default): task dependencies, the
auxiliary MLM task, layer-wise learning-rate decay, weight averaging (EMA, SWA) and R-Drop.
Exact resume with each option on is in test_checkpoint.py (`RESUME_CASES`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.testing import assert_close

from mtl.callbacks import Callback, TrainControl, TrainState
from mtl.config import TrainConfig, dependency_order, find_cycle
from mtl.mlm import MLMBatches
from mtl.model import build_model, load_tokenizer
from mtl.predict import Predictor
from mtl.trainer import Trainer, train
from tests.conftest import BASE_CONFIG

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**over: Any) -> TrainConfig:
    data = copy.deepcopy(BASE_CONFIG)
    data.update(copy.deepcopy(over))
    return TrainConfig.model_validate(data)


THREE = [
    {"name": "a", "num_classes": 2, "depends_on": ["b"]},
    {"name": "b", "num_classes": 3, "depends_on": ["c"]},
    {"name": "c", "num_classes": 4},
]


# -------------------------------------------------------------------------- task dependencies


def test_dependency_order_and_the_dag_check() -> None:
    assert config(tasks=THREE).task_order == ["c", "b", "a"]
    assert dependency_order({"x": [], "y": ["x"], "z": []}) == ["x", "y", "z"]  # stable
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None
    cyclic = copy.deepcopy(THREE)
    cyclic[2]["depends_on"] = ["a"]
    with pytest.raises(ValidationError, match=r"form a cycle: a -> b -> c -> a"):
        config(tasks=cyclic)
    unknown = copy.deepcopy(THREE)
    unknown[0]["depends_on"] = ["nope"]
    with pytest.raises(ValidationError, match=r"tasks\.a\.depends_on: unknown tasks \['nope'\]"):
        config(tasks=unknown)
    itself = copy.deepcopy(THREE)
    itself[2]["depends_on"] = ["c"]
    with pytest.raises(ValidationError, match=r"tasks\.c\.depends_on: a task cannot depend"):
        config(tasks=itself)


def test_a_dependent_head_reads_the_parents_distributions() -> None:
    cfg = config(tasks=THREE)
    model, _ = build_model(cfg.encoder, cfg.tasks, need_tokenizer=False)
    hidden = model.encoder.hidden_size
    # each head's input: the sentence embedding plus its parents' classes
    assert model.heads["c"][1].in_features == hidden
    assert model.heads["b"][1].in_features == hidden + 4
    assert model.heads["a"][1].in_features == hidden + 3
    model.eval()
    pooled = torch.randn(5, hidden)
    out = model.forward_heads(pooled)
    assert list(out) == ["a", "b", "c"]  # config order
    assert {k: tuple(v.shape) for k, v in out.items()} == {"a": (5, 2), "b": (5, 3), "c": (5, 4)}
    # by hand: b = head_b([pooled, softmax(c)])
    c = model.heads["c"](pooled)
    b = model.heads["b"](torch.cat([pooled, torch.softmax(c, -1)], -1))
    assert_close(out["b"], b)
    # changing the parent changes the child
    with torch.no_grad():
        model.heads["c"][1].bias[0] += 3.0  # one class (a shift of all is no change)
    assert not torch.allclose(model.forward_heads(pooled)["b"], out["b"])


@pytest.mark.parametrize("detach", [True, False])
def test_detach_decides_whether_a_childs_loss_trains_its_parent(detach: bool) -> None:
    tasks = copy.deepcopy(THREE[1:])
    tasks[0]["depends_detach"] = detach
    cfg = config(tasks=tasks)
    model, _ = build_model(cfg.encoder, cfg.tasks, need_tokenizer=False)
    pooled = torch.randn(4, model.encoder.hidden_size)
    model.forward_heads(pooled)["b"].sum().backward()
    parent_grad = model.heads["c"][1].weight.grad
    assert (parent_grad is None) is detach
    assert model.heads["b"][1].weight.grad is not None


def test_predict_and_export_carry_the_dependencies(
    make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    train_file = write_rows(tmp_path / "t.csv", labelled_rows(32))
    cfg = make_config(
        tasks=[
            {"name": "sentiment", "num_classes": 3, "depends_on": ["topic"]},
            {"name": "topic", "num_classes": 2},
        ],
        data={"kind": "files", "train": str(train_file), "validation": str(train_file)},
        batch_size=8, epochs=1, monitor="mean/accuracy",
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.fit()
    assert result.model_dir is not None
    meta = json.loads((result.model_dir / "mtl.json").read_text())
    assert meta["task_order"] == ["topic", "sentiment"]
    assert meta["tasks"][0]["depends_on"] == ["topic"] and meta["tasks"][0]["depends_detach"]
    predictor = Predictor.load(result.model_dir)
    texts = ["a wonderful story about football", "a terrible story about election"]
    enc = trainer.tokenizer(
        texts, padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(enc["input_ids"], enc["attention_mask"])
    rows = predictor.predict(texts)
    for task in ("sentiment", "topic"):
        probs = torch.softmax(logits[task], -1)
        got = torch.tensor([list(r[task]["probabilities"].values()) for r in rows])
        assert_close(got, probs, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- auxiliary MLM


def test_the_mlm_masking_rate_the_80_10_10_rule_and_determinism() -> None:
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    texts = [f"the quick brown fox number {i} jumps over the lazy dog again" for i in range(400)]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    batches = MLMBatches(seqs, tokenizer, batch_size=64, probability=0.15, seed=3)
    special = set(tokenizer.all_special_ids)
    chosen = masked = random_or_kept = candidates = 0
    for index in range(len(batches) // 64 + 1):
        ids, mask, labels = batches.batch(index)
        original = torch.where(labels != -100, labels, ids)
        is_special = torch.isin(original, torch.tensor(sorted(special))) | (mask == 0)
        assert not bool(((labels != -100) & is_special).any())  # specials, padding: never
        candidates += int((~is_special).sum())
        chosen += int((labels != -100).sum())
        masked += int(((labels != -100) & (ids == tokenizer.mask_token_id)).sum())
        random_or_kept += int(((labels != -100) & (ids != tokenizer.mask_token_id)).sum())
    assert abs(chosen / candidates - 0.15) < 0.015, chosen / candidates
    assert abs(masked / chosen - 0.8) < 0.04, masked / chosen
    assert abs(random_or_kept / chosen - 0.2) < 0.04
    # batch i is a function of (seed, i): the same on a fresh object (a resumed run)
    again = MLMBatches(seqs, tokenizer, batch_size=64, probability=0.15, seed=3)
    for index in (0, 5, 13):
        for x, y in zip(batches.batch(index), again.batch(index), strict=True):
            assert torch.equal(x, y)
    assert not torch.equal(batches.batch(0)[0], batches.batch(7)[0])


def mlm_config(
    make_config: Any, tmp_path: Path, write_rows: Any, labelled_rows: Any, **mlm: Any
) -> TrainConfig:
    train_file = write_rows(tmp_path / "t.csv", labelled_rows(32))
    return make_config(
        tasks=[{"name": "sentiment", "num_classes": 3}, {"name": "topic", "num_classes": 2}],
        data={"kind": "files", "train": str(train_file), "validation": str(train_file)},
        batch_size=8, epochs=1, monitor="mean/accuracy", mlm={"weight": 0.5, **mlm},
    )  # fmt: skip


class Logs(Callback):
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, state: TrainState, metrics: dict[str, Any], control: TrainControl) -> None:
        self.logs.append(metrics)


def test_mlm_ties_its_head_reports_loss_and_accuracy_and_reads_extra_texts(
    make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    unlabeled = write_rows(
        tmp_path / "u.csv", [{"body": f"an unlabeled review number {i}"} for i in range(24)]
    )
    cfg = mlm_config(
        make_config, tmp_path, write_rows, labelled_rows, data=str(unlabeled), text_column="body"
    )
    logs = Logs()
    trainer = Trainer(cfg, tmp_path / "run", callbacks=[logs])
    assert trainer.mlm_head is not None and trainer.mlm_batches is not None
    embeddings = trainer.model.encoder.transformer.get_input_embeddings().weight
    assert trainer.mlm_head.predictions.decoder.weight is embeddings  # tied
    assert len(trainer.mlm_batches) == 32 + 24  # the training texts and the extra ones
    result = trainer.fit()
    assert result.outcome == "completed"
    assert all(
        0 < log["mlm"]["loss"] < 20 and 0 <= log["mlm"]["accuracy"] <= 1 for log in logs.logs
    )
    # the classifier export does not carry the MLM head unless asked
    assert result.model_dir is not None and not (result.model_dir / "mlm_head.safetensors").exists()


def test_the_mlm_loss_changes_the_encoder_update(
    make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    def encoder_after_one_step(weight: float) -> dict[str, torch.Tensor]:
        cfg = mlm_config(make_config, tmp_path, write_rows, labelled_rows)
        cfg = TrainConfig.model_validate(
            {**cfg.model_dump(), "mlm": {"weight": weight}, "max_steps": 1}
        )
        trainer = Trainer(cfg, tmp_path / f"w{weight}")
        trainer.fit()
        return {k: v.clone() for k, v in trainer.model.encoder.state_dict().items()}

    off, on = encoder_after_one_step(1e-9), encoder_after_one_step(5.0)
    moved = [k for k in off if not torch.allclose(off[k], on[k])]
    assert any("layer" in k for k in moved)


def test_mlm_needs_text_and_an_encoder_that_trains() -> None:
    with pytest.raises(ValidationError, match="mlm needs text"):
        config(mlm={"weight": 1.0})  # dummy token ids: no vocabulary to mask
    with pytest.raises(ValidationError, match=r"mlm\.weight|less than or equal to 100"):
        config(mlm={"weight": 1000.0})


# ---------------------------------------------------------------------- layer-wise lr decay


def test_layer_decay_gives_each_layer_the_rate_of_the_one_above_times_the_factor(
    tmp_path: Path,
) -> None:
    encoder = copy.deepcopy(BASE_CONFIG["encoder"])
    encoder["random_init"]["num_hidden_layers"] = 3
    cfg = config(encoder=encoder, optimizer={"name": "adam", "lr": 1e-2, "encoder_lr": 1e-3,
                                             "layer_decay": 0.5})  # fmt: skip
    trainer = Trainer(cfg, tmp_path)
    transformer = trainer.model.encoder.transformer
    lr_of = {
        id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]
    }
    layers = transformer.encoder.layer
    for i, layer in enumerate(layers):
        expected = 1e-3 * 0.5 ** (len(layers) - 1 - i)  # the top layer trains at encoder_lr
        assert [lr_of[id(p)] for p in layer.parameters()] == pytest.approx(
            [expected] * len(list(layer.parameters()))
        )
    rates = {lr_of[id(p)] for p in transformer.embeddings.parameters()}
    assert max(abs(r - 1e-3 * 0.5**3) for r in rates) < 1e-12
    assert max(abs(lr_of[id(p)] - 1e-2) for p in trainer.model.heads.parameters()) < 1e-12
    with pytest.raises(ValidationError, match="layer_decay"):
        config(optimizer={"layer_decay": -0.1})


# --------------------------------------------------------------------------- weight averaging


class Weights(Callback):
    """The raw model's weights after every optimizer step."""

    def __init__(self, trainer_ref: list[Trainer]) -> None:
        self.ref = trainer_ref
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, state: TrainState, control: TrainControl) -> None:
        model = self.ref[0].model
        self.after[state.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_the_average_matches_a_hand_computation_and_is_what_is_exported(
    kind: str, tmp_path: Path
) -> None:
    averaging = {"kind": "ema", "ema_decay": 0.8} if kind == "ema" else {
        "kind": "swa", "swa_start": 0.5, "swa_every": 2}  # fmt: skip
    cfg = config(averaging=averaging, epochs=1, eval_every=None)
    ref: list[Trainer] = []
    weights = Weights(ref)
    trainer = Trainer(cfg, tmp_path / kind, callbacks=[weights])
    ref.append(trainer)
    result = trainer.fit()
    steps = sorted(weights.after)
    assert steps == list(range(1, trainer.total_steps + 1))
    if kind == "ema":
        expected = weights.after[1]
        for step in steps[1:]:
            expected = {k: 0.8 * expected[k] + 0.2 * weights.after[step][k] for k in expected}
        counted = len(steps)
    else:
        first = -(-trainer.total_steps // 2)  # ceil(0.5 * 8) = 4: steps 4, 6, 8
        used = [s for s in steps if s >= first and (s - first) % 2 == 0]
        assert used == [4, 6, 8]
        expected = {k: sum(weights.after[s][k] for s in used) / len(used) for k in weights.after[1]}
        counted = len(used)
    assert trainer.average is not None and int(trainer.average.n_averaged) == counted
    averaged = trainer.average.module.state_dict()
    # buffers (BERT's integer position ids) are the model's, not averaged (an EMA would round)
    for name, buffer in trainer.model.named_buffers():
        assert torch.equal(dict(trainer.average.module.named_buffers())[name], buffer), name
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    assert_close({k: averaged[k] for k in floats}, {k: expected[k] for k in floats},
                 atol=1e-6, rtol=1e-5)  # fmt: skip
    # the export is the average, not the raw weights (the last evaluation was the best here)
    assert result.model_dir is not None
    meta = json.loads((result.model_dir / "mtl.json").read_text())
    assert meta["averaging"] == {"kind": kind, "n_averaged": counted}
    predictor = Predictor.load(result.model_dir)
    assert_close(predictor.model.heads["task_a"].state_dict()["1.weight"],
                 averaged["heads.task_a.1.weight"])  # fmt: skip
    assert not torch.allclose(averaged["heads.task_a.1.weight"],
                              trainer.model.state_dict()["heads.task_a.1.weight"])  # fmt: skip


# ---------------------------------------------------------------------------------- R-Drop


def test_rdrop_loss_is_the_mean_cross_entropy_plus_the_symmetric_kl(tmp_path: Path) -> None:
    alpha = 2.0
    cfg = config(rdrop={"alpha": alpha})
    trainer = Trainer(cfg, tmp_path)
    seen: dict[str, torch.Tensor] = {}
    combine = trainer.weighting.combine

    def spy(losses: dict[str, torch.Tensor]) -> Any:
        seen.update({t: v.detach().clone() for t, v in losses.items()})
        return combine(losses)

    trainer.weighting.combine = spy  # type: ignore[method-assign]
    batch = trainer.data.epoch_plan(0)[0]
    trainer.model.train()
    state = torch.get_rng_state()
    trainer._backward(batch, 1, sample_cosine=False)
    # by hand, the same dropout draws: encoder once, then the heads twice
    torch.set_rng_state(state)
    with torch.no_grad():
        pooled = trainer.model.encoder(batch.input_ids, batch.attention_mask)
        first = trainer.model.forward_heads(pooled)
        second = trainer.model.forward_heads(pooled)
    for task in cfg.task_names:
        y = batch.labels[task]
        p1, p2 = torch.softmax(first[task], -1), torch.softmax(second[task], -1)
        kl12 = (p1 * (p1.log() - p2.log())).sum(-1).mean()
        kl21 = (p2 * (p2.log() - p1.log())).sum(-1).mean()
        ce = 0.5 * (F.cross_entropy(first[task], y) + F.cross_entropy(second[task], y))
        assert float(kl12 + kl21) > 0  # head dropout: the two passes differ
        assert_close(seen[task], ce + alpha / 4 * (kl12 + kl21), atol=1e-5, rtol=1e-5)


def test_every_option_trains_together(tmp_path: Path) -> None:
    tasks = copy.deepcopy(BASE_CONFIG["tasks"])
    tasks[1]["depends_on"] = ["task_a"]
    cfg = config(tasks=tasks, averaging={"kind": "ema", "ema_decay": 0.9}, rdrop={"alpha": 1.0},
                 optimizer={"name": "adam", "lr": 3e-3, "layer_decay": 0.8}, epochs=3)  # fmt: skip
    result = train(cfg, tmp_path)
    accuracy = {t: m["accuracy"] for t, m in result.metrics["validation"]["tasks"].items()}
    assert result.outcome == "completed" and min(accuracy.values()) >= 0.8, accuracy
