"""The exported model directory and the Predictor: loadable by transformers, label names kept,
probabilities that match the trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from mtl.errors import ModelError
from mtl.predict import Predictor
from mtl.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "a wonderful story about football",
    "a terrible story about election",
    "an ordinary story about football and nothing else at all",
]


def train_on_csv(
    make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path, **overrides: Any
) -> tuple[Trainer, Path]:
    path = write_rows(tmp_path / "train.csv", labelled_rows(48, missing_topic_row=4))
    options: dict[str, Any] = {
        "tasks": [{"name": "sentiment", "num_classes": 3}, {"name": "topic", "num_classes": 2}],
        "data": {"kind": "files", "train": str(path), "validation_fraction": 0.25},
        "batch_size": 8,
        "monitor": "mean/accuracy",
    }
    config = make_config(**{**options, **overrides})
    trainer = Trainer(config, tmp_path / "run")
    result = trainer.fit()
    assert result.outcome == "completed" and result.model_dir is not None
    return trainer, result.model_dir


def test_export_loads_with_transformers_and_predicts_label_names(
    make_config: Any, write_rows: Any, labelled_rows: Any, tmp_path: Path
) -> None:
    from transformers import AutoModel, AutoTokenizer

    # 15 epochs of 5 steps: enough for the tiny encoder to learn the label words
    trainer, model_dir = train_on_csv(make_config, write_rows, labelled_rows, tmp_path, epochs=15)
    encoder = AutoModel.from_pretrained(model_dir)
    trained: Any = trainer.model.encoder.transformer
    assert encoder.config.hidden_size == 32 and encoder.config.num_hidden_layers == 1
    assert_close(
        encoder.embeddings.word_embeddings.weight,
        trained.embeddings.word_embeddings.weight.detach(),
    )
    assert AutoTokenizer.from_pretrained(model_dir).vocab_size == 30522
    meta = json.loads((model_dir / "mtl.json").read_text())
    # the string labels of the CSV are kept, in sorted order
    assert {t["name"]: t["labels"] for t in meta["tasks"]} == {
        "sentiment": ["neg", "neu", "pos"],
        "topic": ["politics", "sport"],
    }
    assert meta["has_tokenizer"] is True and meta["pooling"] == "mean"

    predictor = Predictor.load(model_dir)
    assert predictor.task_names == ["sentiment", "topic"]
    results = predictor.predict(TEXTS)
    assert len(results) == len(TEXTS)
    for row in results:
        assert set(row) == {"sentiment", "topic"}
        for task, names in (("sentiment", ["neg", "neu", "pos"]), ("topic", ["politics", "sport"])):
            assert row[task]["label"] in names
            probs = row[task]["probabilities"]
            assert list(probs) == names
            assert all(0.0 <= p <= 1.0 for p in probs.values())
            assert_close(sum(probs.values()), 1.0, atol=1e-5, rtol=0)
            assert row[task]["label"] == max(probs, key=probs.__getitem__)
    # it learned the label words: the names it predicts are the CSV's labels of its rows
    rows = labelled_rows(48, missing_topic_row=4)
    predicted = predictor.predict([r["text"] for r in rows])
    for task in ("sentiment", "topic"):
        pairs = [(p[task]["label"], r[task]) for p, r in zip(predicted, rows, strict=True)]
        labelled = [(p, y) for p, y in pairs if y]
        assert len(labelled) == (48 if task == "sentiment" else 47)
        assert sum(p == y for p, y in labelled) / len(labelled) >= 0.9, task


@pytest.mark.parametrize(("pooling", "normalize"), [("mean", False), ("cls", False), ("max", True)])
def test_predictor_matches_the_trained_model(
    pooling: str,
    normalize: bool,
    make_config: Any,
    write_rows: Any,
    labelled_rows: Any,
    tmp_path: Path,
) -> None:
    trainer, model_dir = train_on_csv(
        make_config,
        write_rows,
        labelled_rows,
        tmp_path,
        encoder={"pooling": pooling, "normalize": normalize},
        tasks=[
            {"name": "sentiment", "num_classes": 3, "head": {"type": "mlp", "hidden_size": 16}},
            {"name": "topic", "num_classes": 2},
        ],
    )
    predictor = Predictor.load(model_dir)
    results = predictor.predict(TEXTS, batch_size=2)  # two batches, padded differently
    model = trainer.model.eval()
    tokenizer: Any = trainer.tokenizer
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"])
    for task, names in predictor.labels.items():
        expected = torch.softmax(logits[task], dim=-1)
        got = torch.tensor([[r[task]["probabilities"][n] for n in names] for r in results])
        assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_a_dummy_trained_model_gets_the_tokenizer_of_encoder_model(
    make_config: Any, tmp_path: Path
) -> None:
    trainer = Trainer(make_config(epochs=1), tmp_path)
    assert trainer.tokenizer is None  # dummy data is token ids: none needed to train
    result = trainer.fit()
    assert result.model_dir is not None
    meta = json.loads((result.model_dir / "mtl.json").read_text())
    assert meta["has_tokenizer"] is True
    assert [t["labels"] for t in meta["tasks"]] == [["0", "1", "2", "3", "4"], ["0", "1", "2"]]
    assert "metrics" in meta and set(meta["metrics"]["validation"]) == {"task_a", "task_b"}
    out = Predictor.load(result.model_dir).predict(["hello world"])
    assert out[0]["task_a"]["label"] in {"0", "1", "2", "3", "4"}
    assert out[0]["task_b"]["label"] in {"0", "1", "2"}
    assert not list(tmp_path.glob(".tmp-*"))  # the export's temp dir was renamed into place


def test_a_model_without_a_fitting_tokenizer_cannot_read_text(
    make_config: Any, tmp_path: Path
) -> None:
    # a 1000-token vocabulary: BERT's tokenizer (30522 ids) does not fit, so none is exported
    config = make_config(
        encoder={"random_init": {"vocab_size": 1000}}, data={"vocab_size": 1000}, max_steps=2
    )
    result = Trainer(config, tmp_path).fit()
    assert result.model_dir is not None
    meta = json.loads((result.model_dir / "mtl.json").read_text())
    assert meta["has_tokenizer"] is False
    assert not (result.model_dir / "tokenizer.json").exists()
    predictor = Predictor.load(result.model_dir)
    with pytest.raises(ModelError, match="trained without a tokenizer"):
        predictor.predict(["some text"])


def test_loading_a_directory_that_is_not_a_model_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not an exported mtl model"):
        Predictor.load(tmp_path)
