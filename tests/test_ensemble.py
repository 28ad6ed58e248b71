"""Seed ensembles (`mtl.ensemble`): the folder, the averaged probabilities, the refusals, and
`mtl ensemble` on the command line."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mtl.cli import app
from mtl.config import TrainConfig
from mtl.ensemble import EnsemblePredictor, MemberError, export_ensemble
from mtl.errors import ModelError
from mtl.predict import Predictor
from mtl.trainer import Trainer
from tests.conftest import BASE_CONFIG

TEXTS = ["a wonderful story about football", "terrible", "an ordinary day, nothing else at all"]


def _train(folder: Path, **overrides: Any) -> Path:
    """A tiny random BERT on the learnable dummy data, a few steps: its exported model (with
    the bundled MiniLM tokenizer, so it reads text)."""
    raw = copy.deepcopy(BASE_CONFIG)
    raw.update({"max_steps": 3, "log_every": 10, **overrides})
    result = Trainer(TrainConfig.model_validate(raw), folder).fit()
    assert result.model_dir is not None
    return result.model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two members of the same tasks (seeds 0 and 1), one with another task, one with another
    label set for task_b."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("members")
    try:
        yield {
            "a": _train(root / "a", seed=0),
            "b": _train(root / "b", seed=1),
            "other_task": _train(
                root / "c",
                tasks=[{"name": "task_a", "num_classes": 5}, {"name": "task_c", "num_classes": 3}],
            ),
            "other_labels": _train(
                root / "d",
                tasks=[{"name": "task_a", "num_classes": 5}, {"name": "task_b", "num_classes": 4}],
            ),
        }
    finally:
        torch.set_num_threads(threads)


def test_the_probabilities_are_the_weighted_mean_of_the_members(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = export_ensemble(tmp_path / "ens", [models["a"], models["b"]], weights=[1.0, 3.0])
    assert out == tmp_path / "ens"
    assert not list(tmp_path.glob(".tmp-*"))  # written to a temp folder, then renamed
    meta = json.loads((out / "mtl.json").read_text())
    first = json.loads((models["a"] / "mtl.json").read_text())
    assert meta["kind"] == "ensemble"
    assert meta["members"] == [
        {"path": "members/0", "weight": 0.25},
        {"path": "members/1", "weight": 0.75},
    ]
    assert meta["tasks"] == first["tasks"] and meta["task_order"] == first["task_order"]
    assert meta["max_length"] == first["max_length"] and meta["has_tokenizer"] is True
    for i, member in enumerate((models["a"], models["b"])):  # copies of the members
        assert (out / "members" / str(i) / "mtl.json").read_bytes() == (
            member / "mtl.json"
        ).read_bytes()
        assert (out / "members" / str(i) / "heads.safetensors").is_file()

    ensemble = Predictor.load(out)
    assert isinstance(ensemble, EnsemblePredictor)
    assert ensemble.task_names == ["task_a", "task_b"]
    got = ensemble.predict(TEXTS, batch_size=2)
    pa, pb = (Predictor.load(models[m]).predict(TEXTS) for m in ("a", "b"))
    assert len(got) == len(TEXTS)
    differs = 0.0
    for row, ra, rb in zip(got, pa, pb, strict=True):
        assert list(row) == ["task_a", "task_b"]
        for task, labels in (("task_a", ["0", "1", "2", "3", "4"]), ("task_b", ["0", "1", "2"])):
            probs = row[task]["probabilities"]
            assert list(probs) == labels
            for label in labels:
                a, b = ra[task]["probabilities"][label], rb[task]["probabilities"][label]
                assert abs(probs[label] - (0.25 * a + 0.75 * b)) < 1e-6
                differs = max(differs, abs(a - b))
            assert row[task]["label"] == max(probs, key=probs.__getitem__)
            assert abs(sum(probs.values()) - 1) < 1e-5
    assert differs > 1e-4  # two different members: the mean is not one of them


def test_equal_weights_by_default(models: dict[str, Path], tmp_path: Path) -> None:
    out = export_ensemble(tmp_path / "ens", [models["a"], models["b"], models["a"]])
    weights = [m["weight"] for m in json.loads((out / "mtl.json").read_text())["members"]]
    assert weights == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("other_task", "member 1 .*: its tasks differ from member 0's: it has no task 'task_b'"),
        (
            "other_labels",
            r"member 1 .*: its tasks differ from member 0's: task 'task_b' has the labels "
            r"\['0', '1', '2', '3'\], not \['0', '1', '2'\]",
        ),
    ],
)
def test_members_with_other_tasks_or_labels_are_refused(
    models: dict[str, Path], tmp_path: Path, member: str, message: str
) -> None:
    with pytest.raises(MemberError, match=message) as caught:
        export_ensemble(tmp_path / "ens", [models["a"], models[member]])
    assert caught.value.member == 1 and caught.value.tasks_differ
    assert not (tmp_path / "ens").exists() and not list(tmp_path.glob(".tmp-*"))
    # the third member is named when it is the one that differs
    with pytest.raises(MemberError, match="member 2 ") as caught:
        export_ensemble(tmp_path / "ens", [models["a"], models["b"], models[member]])
    assert caught.value.member == 2


def test_a_task_more_is_refused_too(models: dict[str, Path], tmp_path: Path) -> None:
    meta = json.loads((models["a"] / "mtl.json").read_text())
    meta["tasks"].append({**meta["tasks"][1], "name": "task_c"})
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "mtl.json").write_text(json.dumps(meta))  # checked before any copy
    with pytest.raises(MemberError, match="it has a task 'task_c' more") as caught:
        export_ensemble(tmp_path / "ens", [models["a"], tmp_path / "more"])
    assert caught.value.member == 1


def test_fewer_than_two_members_and_bad_weights_are_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match="at least 2 members, got 1"):
        export_ensemble(tmp_path / "ens", [models["a"]])
    with pytest.raises(ModelError, match="1 weights for 2 members"):
        export_ensemble(tmp_path / "ens", [models["a"], models["b"]], weights=[1.0])
    with pytest.raises(ModelError, match=r"weight 1 is 0\.0"):
        export_ensemble(tmp_path / "ens", [models["a"], models["b"]], weights=[1.0, 0.0])
    with pytest.raises(MemberError, match=r"member 1 .*not an exported mtl model"):
        export_ensemble(tmp_path / "ens", [models["a"], tmp_path])
    assert not (tmp_path / "ens").exists()


def test_ensembles_do_not_nest_and_the_output_must_not_be_a_member(
    models: dict[str, Path], tmp_path: Path
) -> None:
    ens = export_ensemble(tmp_path / "ens", [models["a"], models["b"]])
    with pytest.raises(MemberError, match=r"member 0 .*ensemble itself") as caught:
        export_ensemble(tmp_path / "nested", [ens, models["a"]])
    assert caught.value.member == 0
    # a hand-made nested one does not load either
    meta = json.loads((ens / "mtl.json").read_text())
    meta["members"][1]["path"] = "inner"
    export_ensemble(ens / "inner", [models["a"], models["b"]])
    (ens / "mtl.json").write_text(json.dumps(meta))
    with pytest.raises(MemberError, match="ensemble itself"):
        Predictor.load(ens)
    meta["members"][1]["path"] = "../a"
    (ens / "mtl.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="outside the ensemble"):
        Predictor.load(ens)
    with pytest.raises(ModelError, match="overlaps member 0"):
        export_ensemble(models["a"], [models["a"], models["b"]])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelError, match="not an exported mtl model: not replaced"):
        export_ensemble(tmp_path / "precious", [models["a"], models["b"]])
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def run(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_the_cli_writes_an_ensemble_that_mtl_predict_uses(
    models: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ens"
    result = run("ensemble", out, models["a"], models["b"], "--weight", "1", "--weight", "3")
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 models written to" in result.stdout
    weights = [m["weight"] for m in json.loads((out / "mtl.json").read_text())["members"]]
    assert weights == [0.25, 0.75]
    result = run("predict", out, *TEXTS, "--json")
    assert result.exit_code == 0, result.output
    # `mtl predict` runs the members' ONNX exports (ONNX Runtime): PyTorch's answer within 1e-4
    got, want = json.loads(result.stdout), Predictor.load(out).predict(TEXTS)
    assert len(got) == len(want) == len(TEXTS)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for task in w:
            assert g[task]["label"] == w[task]["label"]
            assert g[task]["probabilities"] == pytest.approx(w[task]["probabilities"], abs=1e-4)

    result = run("ensemble", tmp_path / "x", models["a"])
    assert result.exit_code == 2 and "at least two MODEL_DIRs" in result.output
    result = run("ensemble", tmp_path / "x", models["a"], models["other_task"])
    assert result.exit_code == 2
    assert "member 1" in result.output and "task_b" in result.output
    assert not (tmp_path / "x").exists()
