"""The exported folder is also a sentence-transformers model: `SentenceTransformer(path)` loads the
shared encoder with our pooling (and normalisation) and embeds texts exactly as `SentenceEncoder`
does, while `Predictor.load` reads the same folder as before. Exporting does not need the
`sentence_transformers` package; only the tests that load the folder with it do."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.testing import assert_close

from mtl.predict import Predictor
from mtl.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

#: What the export adds for sentence-transformers (besides config.json, weights and tokenizer).
ST_FILES = ["modules.json", "sentence_bert_config.json", "1_Pooling", "2_Normalize"]

TEXTS = [
    "a wonderful story about football",
    "terrible",
    # longer than encoder.max_length (32 tokens): both sides must truncate the same way
    "an ordinary story about football and the election and nothing else at all " * 3,
    "a terrible story about election number 7",
]


@pytest.fixture
def sentence_transformer() -> Any:
    """The `SentenceTransformer` class; the test skips when the optional package is missing."""
    module = pytest.importorskip(
        "sentence_transformers",
        reason="sentence_transformers is not installed (optional: only these checks need it)",
    )
    return module.SentenceTransformer


def export_trained(
    make_config: Any,
    write_rows: Any,
    labelled_rows: Any,
    tmp_path: Path,
    **encoder: Any,
) -> tuple[Trainer, Path]:
    """Two training steps on a small labelled CSV (the tiny BERT + the bundled MiniLM tokenizer),
    then the trainer's own export."""
    path = write_rows(tmp_path / "train.csv", labelled_rows(24))
    config = make_config(
        encoder=encoder,
        tasks=[{"name": "sentiment", "num_classes": 3}, {"name": "topic", "num_classes": 2}],
        data={"kind": "files", "train": str(path), "validation_fraction": 0.25},
        batch_size=8,
        max_steps=2,
    )
    trainer = Trainer(config, tmp_path / "run")
    result = trainer.fit()
    assert result.outcome == "completed" and result.model_dir is not None
    return trainer, result.model_dir


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max"])
def test_sentence_transformers_loads_the_export_and_embeds_like_our_encoder(
    pooling: str,
    normalize: bool,
    sentence_transformer: Any,
    make_config: Any,
    write_rows: Any,
    labelled_rows: Any,
    tmp_path: Path,
) -> None:
    trainer, model_dir = export_trained(
        make_config, write_rows, labelled_rows, tmp_path, pooling=pooling, normalize=normalize
    )
    meta = json.loads((model_dir / "mtl.json").read_text())
    assert meta["sentence_transformers"] is True and meta["has_tokenizer"] is True
    modules = json.loads((model_dir / "modules.json").read_text())
    assert [(m["path"], m["type"].rsplit(".", 1)[1]) for m in modules] == [
        ("", "Transformer"),
        ("1_Pooling", "Pooling"),
        *([("2_Normalize", "Normalize")] if normalize else []),
    ]
    assert (model_dir / "2_Normalize").is_dir() is normalize
    assert json.loads((model_dir / "sentence_bert_config.json").read_text()) == {
        "max_seq_length": 32,
        "do_lower_case": False,
    }
    pooling_config = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    assert pooling_config["word_embedding_dimension"] == 32
    assert [k for k, v in pooling_config.items() if v is True] == [
        {
            "mean": "pooling_mode_mean_tokens",
            "cls": "pooling_mode_cls_token",
            "max": "pooling_mode_max_tokens",
        }[pooling]
    ]

    # a local folder: nothing is fetched from the hub (the suite runs offline)
    st = sentence_transformer(str(model_dir), device="cpu", local_files_only=True)
    assert st.max_seq_length == 32
    assert st.get_embedding_dimension() == 32
    got = st.encode(TEXTS, convert_to_tensor=True, batch_size=2)  # batches padded differently

    encoder = trainer.model.encoder.eval()  # the trained `SentenceEncoder`, in memory
    assert (encoder.pooling, encoder.normalize) == (pooling, normalize)
    enc = trainer.tokenizer(
        TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt"
    )
    assert enc["attention_mask"][2].all() and enc["input_ids"].shape[1] == 32  # truncated
    with torch.no_grad():
        expected = encoder(enc["input_ids"], enc["attention_mask"])
    assert got.shape == expected.shape == (len(TEXTS), 32)
    assert_close(got.cpu().float(), expected, atol=1e-5, rtol=0)
    if normalize:
        assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5, rtol=0)

    # the Predictor reads the same folder and answers as it does without the added files
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    for name in ST_FILES:
        target = plain / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    before = Predictor.load(plain).predict(TEXTS)
    after = Predictor.load(model_dir).predict(TEXTS)
    assert after == before
    with torch.no_grad():
        logits = trainer.model.eval()(enc["input_ids"], enc["attention_mask"])
    for task, names in (("sentiment", ["neg", "neu", "pos"]), ("topic", ["politics", "sport"])):
        probs = torch.tensor([[row[task]["probabilities"][n] for n in names] for row in after])
        assert_close(probs, torch.softmax(logits[task], dim=-1), atol=1e-5, rtol=1e-4)


def test_exporting_needs_no_sentence_transformers_and_skips_the_layout_without_a_tokenizer(
    make_config: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `import sentence_transformers` fails while these models train and export
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)

    # a tokenizer (BERT's, from encoder.model): the layout is written without the library
    result = Trainer(make_config(max_steps=1), tmp_path / "text").fit()
    assert result.model_dir is not None
    assert json.loads((result.model_dir / "mtl.json").read_text())["sentence_transformers"]
    assert (result.model_dir / "modules.json").is_file()

    # a 1000-token vocabulary: no tokenizer fits, so the encoder cannot embed text and the
    # export says so instead of writing a sentence-transformers layout
    config = make_config(
        encoder={"random_init": {"vocab_size": 1000}}, data={"vocab_size": 1000}, max_steps=1
    )
    result = Trainer(config, tmp_path / "ids").fit()
    assert result.model_dir is not None
    meta = json.loads((result.model_dir / "mtl.json").read_text())
    assert meta["has_tokenizer"] is False and meta["sentence_transformers"] is False
    assert not any((result.model_dir / name).exists() for name in ST_FILES)
