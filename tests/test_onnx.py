"""The ONNX export (`mtl.onnx`) and the ONNX Runtime predictor (`mtl.ort_predict`): one graph
that answers like the PyTorch model for every pooling, with normalisation and task
dependencies; int8 close to it; a predictor that runs without torch; the loader's choice
between the two engines; `mtl export --onnx`; clear errors for broken exports."""

from __future__ import annotations

import copy
import csv
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mtl.cli import app
from mtl.config import TrainConfig
from mtl.ensemble import EnsemblePredictor, export_ensemble
from mtl.errors import ModelError
from mtl.export import export_model
from mtl.layout import ONNX_FILE, ONNX_INT8_FILE
from mtl.ort_predict import OrtPredictor, has_onnx, load_predictor
from mtl.predict import Predictor
from mtl.trainer import Trainer
from tests.conftest import BASE_CONFIG, SENTIMENT_WORDS, TOPIC_WORDS

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"sentiment": ["neg", "neu", "pos"], "topic": ["politics", "sport"]}
#: the tiny encoder's max_length (tests/conftest.py): longer texts are truncated
MAX_LENGTH = BASE_CONFIG["encoder"]["max_length"]


def varied_texts(n: int = 200, seed: int = 0) -> list[str]:
    """`n` texts of every length: empty and whitespace-only ones, single tokens, punctuation,
    digits, accents and emoji, sentences with and without the label words, and texts far longer
    than `MAX_LENGTH` tokens (truncated)."""
    rng = random.Random(seed)
    words = [
        *SENTIMENT_WORDS.values(),
        *TOPIC_WORDS.values(),
        "a", "story", "about", "the", "number", "and", "nothing", "else", "Résumé", "naïve",
        "don't", "e-mail", "COVID-19", "3.14", "1999", "🙂", "!!!", "?", "...", "日本語",
        "unbelievably", "antidisestablishmentarianism", "x", "of", "match", "vote", "goal",
    ]  # fmt: skip
    fixed = ["", " ", "\n", "!", "a", "wonderful", "terrible election", "🙂🙂🙂", "x " * 200]
    texts = list(fixed)
    while len(texts) < n:
        length = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 55, 89])
        texts.append(" ".join(rng.choice(words) for _ in range(length)))
    return texts[:n]


TEXTS = varied_texts()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "data":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _rows(n: int) -> list[dict[str, str]]:
    sentiments, topics = sorted(SENTIMENT_WORDS), sorted(TOPIC_WORDS)
    rows = []
    for i in range(n):
        s, t = sentiments[i % 3], topics[(i // 3) % 2]
        rows.append(
            {
                "text": f"a {SENTIMENT_WORDS[s]} story about {TOPIC_WORDS[t]} number {i}",
                "sentiment": s,
                "topic": t,
            }
        )
    return rows


def train_model(folder: Path, validation_fraction: float = 0.25, **overrides: Any) -> Path:
    """The tiny BERT (with the bundled MiniLM tokenizer) trained on a small labelled CSV; the
    trainer's own export, with the config's `onnx` section."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "sentiment", "topic"])
        writer.writeheader()
        writer.writerows(_rows(48))
    raw = _merge(
        BASE_CONFIG,
        {
            "tasks": [{"name": "sentiment", "num_classes": 3}, {"name": "topic", "num_classes": 2}],
            "data": {
                "kind": "files",
                "train": str(path),
                "validation_fraction": validation_fraction,
            },
            "batch_size": 8,
            "monitor": "mean/accuracy",
            "max_steps": 3,
        },
    )
    raw = _merge(raw, overrides)
    result = Trainer(TrainConfig.model_validate(raw), folder / "run").fit()
    assert result.outcome == "completed" and result.model_dir is not None
    return result.model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Trained and exported once for the module (one intra-op thread: a busy 2-core machine).

    * `deps`: mean pooling, `topic` reads `sentiment`'s distribution, fp32 and int8; 40 steps
      and no validation split, so the last (most confident) weights are exported;
    * `cls_norm`, `max`, `max_norm`: the other poolings, L2-normalised or not (3 steps);
    * `plain`: exported without ONNX (`onnx.export: false`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx-models")
    try:
        yield {
            "deps": train_model(
                root / "deps",
                tasks=[
                    {"name": "sentiment", "num_classes": 3},
                    {"name": "topic", "num_classes": 2, "depends_on": ["sentiment"]},
                ],
                validation_fraction=0.0,
                max_steps=40,
                onnx={"int8": True},
            ),
            "cls_norm": train_model(root / "cls", encoder={"pooling": "cls", "normalize": True}),
            "max": train_model(root / "max", encoder={"pooling": "max"}),
            "max_norm": train_model(root / "maxn", encoder={"pooling": "max", "normalize": True}),
            "plain": train_model(root / "plain", onnx={"export": False}),
        }
    finally:
        torch.set_num_threads(before)


def compare(torch_rows: list[dict[str, Any]], onnx_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Same tasks and labels in the same order; returns the largest probability difference and
    the share of (text, task) pairs whose label agrees."""
    assert len(torch_rows) == len(onnx_rows)
    worst, same, total = 0.0, 0, 0
    for want, got in zip(torch_rows, onnx_rows, strict=True):
        assert list(got) == list(want)
        for task in want:
            assert list(got[task]) == ["label", "probabilities"]
            assert list(got[task]["probabilities"]) == list(want[task]["probabilities"])
            diffs = [
                abs(got[task]["probabilities"][n] - p)
                for n, p in want[task]["probabilities"].items()
            ]
            worst = max(worst, *diffs)
            same += got[task]["label"] == want[task]["label"]
            total += 1
    return {"max_diff": worst, "agreement": same / total}


# ----------------------------------------------------------------------------------- the export


def test_the_trainer_writes_the_onnx_export_and_records_it(models: dict[str, Path]) -> None:
    import onnx

    folder = models["deps"]
    meta = json.loads((folder / "mtl.json").read_text())
    assert meta["onnx"] == {
        "file": ONNX_FILE,
        "int8": ONNX_INT8_FILE,
        "opset": 17,
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["sentiment", "topic", "embedding"],
    }
    assert (folder / ONNX_FILE).is_file() and (folder / ONNX_INT8_FILE).is_file()
    assert not [p for p in (folder / "onnx").iterdir() if p.name.startswith(".tmp")]
    graph = onnx.load(str(folder / ONNX_FILE)).graph
    # no token_type_ids: the encoder never gets one (segment 0, in PyTorch and in the graph)
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["sentiment", "topic", "embedding"]
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch", value.name  # dynamic, not the traced 2
    for value in graph.input:
        assert value.type.tensor_type.shape.dim[1].dim_param == "sequence"
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim[1:]] == [3]
    assert [d.dim_value for d in graph.output[2].type.tensor_type.shape.dim[1:]] == [32]
    # the int8 graph multiplies in int8 (weights quantised ahead, activations on the fly)
    ops = {n.op_type for n in onnx.load(str(folder / ONNX_INT8_FILE)).graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops
    assert "MatMulInteger" not in {n.op_type for n in graph.node}
    # the default config exports fp32 only
    meta = json.loads((models["max"] / "mtl.json").read_text())
    assert meta["onnx"]["int8"] is None and not (models["max"] / ONNX_INT8_FILE).exists()
    assert "onnx" not in json.loads((models["plain"] / "mtl.json").read_text())
    assert not (models["plain"] / "onnx").exists()


def test_the_config_section() -> None:
    base = _merge(BASE_CONFIG, {})
    assert TrainConfig.model_validate(base).onnx.model_dump() == {"export": True, "int8": False}
    with pytest.raises(ValueError, match=r"onnx\.int8 .* needs onnx\.export"):
        TrainConfig.model_validate(_merge(base, {"onnx": {"export": False, "int8": True}}))
    with pytest.raises(ValueError, match="extra"):
        TrainConfig.model_validate(_merge(base, {"onnx": {"opset": 18}}))
    named = _merge(base, {"tasks": [{"name": "embedding", "num_classes": 2}]})
    with pytest.raises(ValueError, match="task 'embedding': the ONNX export"):
        TrainConfig.model_validate(named)
    assert TrainConfig.model_validate(_merge(named, {"onnx": {"export": False}}))


# --------------------------------------------------------------------------------------- parity


def test_fp32_matches_pytorch_with_task_dependencies(models: dict[str, Path]) -> None:
    """200 texts of every length: the same label for every text and task, probabilities within
    1e-4, in the same order; any batch size (dynamic batch and sequence axes)."""
    folder = models["deps"]
    want = Predictor.load(folder).predict(TEXTS)
    onnx_predictor = OrtPredictor.load(folder, int8=False)
    assert onnx_predictor.model_file == folder / ONNX_FILE
    assert onnx_predictor.task_names == ["sentiment", "topic"]
    got = onnx_predictor.predict(TEXTS)
    result = compare(want, got)
    print(f"fp32 vs PyTorch: max probability difference {result['max_diff']:.2e}")
    assert result["agreement"] == 1.0 and result["max_diff"] <= 1e-4
    # the model learned something: the parity is not that of two uniform distributions
    assert max(r["sentiment"]["probabilities"][r["sentiment"]["label"]] for r in want) > 0.5
    for batch_size in (1, 7, 200):
        other = onnx_predictor.predict(TEXTS, batch_size=batch_size)
        assert compare(want, other)["max_diff"] <= 1e-4
    assert onnx_predictor.predict([]) == []


def test_the_dependent_head_reads_the_parents_distribution_in_the_graph(
    models: dict[str, Path],
) -> None:
    """Feeding the graph's own embedding and sentiment logits through the PyTorch head gives
    the graph's topic logits: the dependency is inside the graph."""
    import onnxruntime as ort

    folder = models["deps"]
    model = Predictor.load(folder)
    assert isinstance(model, Predictor)
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    enc = model.tokenizer(TEXTS[:50], padding=True, truncation=True, max_length=MAX_LENGTH)
    feed = {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    sentiment, topic, embedding = session.run(["sentiment", "topic", "embedding"], feed)
    head_in = torch.cat(
        [torch.from_numpy(embedding), torch.softmax(torch.from_numpy(sentiment), dim=-1)], dim=-1
    )
    with torch.no_grad():
        expected = model.model.heads["topic"](head_in)
    assert head_in.shape[1] == 32 + 3
    torch.testing.assert_close(torch.from_numpy(topic), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["cls_norm", "max", "max_norm"])
def test_fp32_matches_pytorch_for_every_pooling(models: dict[str, Path], variant: str) -> None:
    import onnxruntime as ort

    folder = models[variant]
    predictor = Predictor.load(folder)
    assert isinstance(predictor, Predictor)
    meta = json.loads((folder / "mtl.json").read_text())
    assert (meta["pooling"], meta["normalize"]) == {
        "cls_norm": ("cls", True),
        "max": ("max", False),
        "max_norm": ("max", True),
    }[variant]
    result = compare(predictor.predict(TEXTS), OrtPredictor.load(folder).predict(TEXTS))
    assert result["agreement"] == 1.0 and result["max_diff"] <= 1e-4
    # the embedding output is the pooled (and normalised) sentence vector of SentenceEncoder
    enc = predictor.tokenizer(TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH)
    feed = {k: np.asarray(enc[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    session = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    (embedding,) = session.run(["embedding"], feed)
    with torch.no_grad():
        expected = predictor.model.encoder(
            torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
        )
    torch.testing.assert_close(torch.from_numpy(embedding), expected, atol=1e-5, rtol=1e-4)
    norms = np.linalg.norm(embedding, axis=-1)
    if meta["normalize"]:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:
        assert np.abs(norms - 1.0).max() > 1e-2


def test_int8_agrees_with_pytorch_on_almost_every_label(models: dict[str, Path]) -> None:
    folder = models["deps"]
    want = Predictor.load(folder).predict(TEXTS)
    predictor = OrtPredictor.load(folder)  # int8 by default where the export has it
    assert predictor.model_file == folder / ONNX_INT8_FILE
    result = compare(want, predictor.predict(TEXTS))
    print(
        f"int8 vs PyTorch: label agreement {result['agreement']:.4f} over "
        f"{len(TEXTS)} texts x 2 tasks, max probability difference {result['max_diff']:.3f}"
    )
    assert result["agreement"] >= 0.99
    # where they disagree, PyTorch itself hesitated between the two labels
    for row, other in zip(want, predictor.predict(TEXTS), strict=True):
        for task in row:
            if row[task]["label"] != other[task]["label"]:
                top = sorted(row[task]["probabilities"].values(), reverse=True)
                assert top[0] - top[1] < 0.1, (task, top)
    with pytest.raises(ModelError, match="no int8 graph"):
        OrtPredictor.load(models["max"], int8=True)


# ------------------------------------------------------------------------------------ the loader


def test_the_loader_picks_onnx_runtime_where_there_is_an_export(models: dict[str, Path]) -> None:
    assert isinstance(load_predictor(models["max"]), OrtPredictor)
    assert isinstance(load_predictor(models["max"], prefer="onnx"), OrtPredictor)
    assert isinstance(load_predictor(models["max"], prefer="torch"), Predictor)
    # a model without ONNX export (older folders too) predicts through PyTorch
    plain = load_predictor(models["plain"])
    assert isinstance(plain, Predictor) and not has_onnx(models["plain"])
    rows = plain.predict(TEXTS[:5])
    assert [list(r) for r in rows] == [["sentiment", "topic"]] * 5
    with pytest.raises(ModelError, match="has no ONNX export"):
        load_predictor(models["plain"], prefer="onnx")
    with pytest.raises(ModelError, match="prefer must be"):
        load_predictor(models["max"], prefer="tensorflow")  # type: ignore[arg-type]
    threads = load_predictor(models["max"], intra_op_threads=1)
    assert isinstance(threads, OrtPredictor)
    assert threads.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ModelError, match="intra_op_threads"):
        load_predictor(models["max"], intra_op_threads=0)


def test_an_ensemble_runs_on_onnx_runtime_when_every_member_has_an_export(
    models: dict[str, Path], tmp_path: Path
) -> None:
    both = export_ensemble(tmp_path / "ens", [models["deps"], models["max"]], [2.0, 1.0])
    ensemble = load_predictor(both, int8=False)
    assert isinstance(ensemble, EnsemblePredictor)
    assert all(isinstance(m, OrtPredictor) for m in ensemble.members)
    want = Predictor.load(both).predict(TEXTS)
    result = compare(want, ensemble.predict(TEXTS))
    assert result["agreement"] == 1.0 and result["max_diff"] <= 1e-4
    # a member without export: the whole ensemble on PyTorch, and it still predicts
    mixed = export_ensemble(tmp_path / "mixed", [models["max"], models["plain"]])
    fallback = load_predictor(mixed)
    assert isinstance(fallback, EnsemblePredictor)
    assert all(isinstance(m, Predictor) for m in fallback.members)
    assert len(fallback.predict(TEXTS[:3])) == 3
    with pytest.raises(ModelError, match="has no ONNX export"):
        load_predictor(mixed, prefer="onnx")
    # `mtl export --onnx` on an ensemble exports each member that lacks it
    result_cli = CliRunner().invoke(app, ["export", str(mixed), "--onnx"], catch_exceptions=False)
    assert result_cli.exit_code == 0, result_cli.output
    assert isinstance(load_predictor(mixed), EnsemblePredictor) and has_onnx(mixed)


def test_the_predictor_cache_serves_onnx_runtime(models: dict[str, Path]) -> None:
    from app.core.predictors import PredictorCache

    cache = PredictorCache(size=1, intra_op_threads=1)
    rows = cache.predict(models["max"], TEXTS[:4])
    entry = cache._entry(models["max"])
    assert isinstance(entry.predictor, OrtPredictor)
    assert compare(Predictor.load(models["max"]).predict(TEXTS[:4]), rows)["max_diff"] <= 1e-4
    assert isinstance(cache._entry(models["plain"]).predictor, Predictor)


TORCH_FREE = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now fails
from mtl.ort_predict import OrtPredictor, load_predictor
predictor = load_predictor(sys.argv[1])
assert isinstance(predictor, OrtPredictor), type(predictor)
texts = json.loads(sys.stdin.read())
print(json.dumps(predictor.predict(texts)))
"""


def test_the_onnx_predictor_needs_no_torch(models: dict[str, Path]) -> None:
    folder = models["deps"]
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(folder)],
        input=json.dumps(TEXTS),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = OrtPredictor.load(folder).predict(TEXTS)
    assert got == want
    # and it is torch's answer: the labels agree (int8, so not to 1e-4)
    assert compare(Predictor.load(folder).predict(TEXTS), got)["agreement"] >= 0.99


# ------------------------------------------------------------------------------ cli and failures


def test_mtl_export_onnx_int8_adds_the_files_and_is_idempotent(
    models: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(models["plain"], folder)

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, ["export", str(folder), *args], catch_exceptions=False)

    result = run("--onnx", "--int8")
    assert result.exit_code == 0, result.output
    meta = json.loads((folder / "mtl.json").read_text())
    assert meta["onnx"]["int8"] == ONNX_INT8_FILE and meta["onnx"]["file"] == ONNX_FILE
    stamps = {f: (folder / f).stat().st_mtime_ns for f in (ONNX_FILE, ONNX_INT8_FILE, "mtl.json")}
    again = run("--onnx", "--int8")
    assert again.exit_code == 0 and "already there" in again.output
    assert {f: (folder / f).stat().st_mtime_ns for f in stamps} == stamps
    predictor = load_predictor(folder)
    assert isinstance(predictor, OrtPredictor) and predictor.model_file.name == "model.int8.onnx"
    want = Predictor.load(folder).predict(TEXTS)
    assert compare(want, predictor.predict(TEXTS))["agreement"] >= 0.99
    # --onnx alone: the fp32 graph only (the int8 one goes), and --force exports again
    assert run("--onnx").exit_code == 0
    assert not (folder / ONNX_INT8_FILE).exists()
    assert json.loads((folder / "mtl.json").read_text())["onnx"]["int8"] is None
    assert compare(want, load_predictor(folder).predict(TEXTS))["max_diff"] <= 1e-4
    before = (folder / ONNX_FILE).stat().st_mtime_ns
    assert run("--onnx", "--force").exit_code == 0
    assert (folder / ONNX_FILE).stat().st_mtime_ns != before
    # without --onnx there is nothing to do; a folder that is no model is an error
    assert run().exit_code == 2
    bad = CliRunner().invoke(app, ["export", str(tmp_path), "--onnx"], catch_exceptions=False)
    assert bad.exit_code == 1 and "notanexportedmtlmodel" in "".join(bad.output.split())


@pytest.mark.parametrize("damage", ["missing", "corrupt", "wrong graph"])
def test_a_broken_onnx_file_is_a_model_error(
    models: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(models["max"], folder)
    target = folder / ONNX_FILE
    if damage == "missing":
        target.unlink()
        match = "model.onnx is missing"
    elif damage == "corrupt":
        target.write_bytes(b"\x08\x07this is not a protobuf" * 10)
        match = "cannot load the ONNX file onnx/model.onnx"
    else:  # another model's graph: its outputs are not this model's tasks
        meta = json.loads((folder / "mtl.json").read_text())
        meta["tasks"][0]["name"] = "renamed"
        (folder / "mtl.json").write_text(json.dumps(meta))
        match = "does not fit the model"
    with pytest.raises(ModelError, match=match):
        load_predictor(folder)
    with pytest.raises(ModelError, match=match):
        load_predictor(folder, prefer="onnx")
    # the PyTorch path is untouched by it
    if damage != "wrong graph":
        assert isinstance(load_predictor(folder, prefer="torch"), Predictor)


def test_a_failed_onnx_export_leaves_a_model_that_predicts_with_pytorch(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    source = models["plain"]
    predictor = Predictor.load(source)
    assert isinstance(predictor, Predictor)
    config = TrainConfig.model_validate_json((source / "train_config.json").read_text())
    config.onnx.export = True

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the exporter cannot trace this encoder")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with caplog.at_level(logging.WARNING, logger="mtl.export"):
        out = export_model(tmp_path / "model", predictor.model, predictor.tokenizer, config, TASKS)
    assert "without its ONNX graph" in caplog.text and "cannot trace" in caplog.text
    assert "onnx" not in json.loads((out / "mtl.json").read_text())
    assert not (out / "onnx").exists()
    assert isinstance(load_predictor(out), Predictor)
    assert len(load_predictor(out).predict(TEXTS[:3])) == 3
