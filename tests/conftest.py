"""Shared fixtures of the library tests: a tiny encoder, a config factory, small data files.

Nothing here is autouse, so the fixtures cost nothing to tests that do not ask for them.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

#: A BERT small enough to train in a fraction of a second on one CPU core. The vocabulary is
#: BERT's (30522), so the bundled MiniLM tokenizer fits it.
TINY_ENCODER: dict[str, Any] = {
    "random_init": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 30522,
        "max_position_embeddings": 64,
    },
    "max_length": 32,
}

#: The learnable dummy two-task run: task_a 5 classes, task_b 3; 8 steps per epoch.
BASE_CONFIG: dict[str, Any] = {
    "encoder": TINY_ENCODER,
    "tasks": [{"name": "task_a", "num_classes": 5}, {"name": "task_b", "num_classes": 3}],
    "data": {
        "kind": "dummy",
        "num_samples": 256,
        "eval_samples": 128,
        "seq_len": 16,
        "learnable": True,
    },
    "optimizer": {"name": "adam", "lr": 3e-3},
    "scheduler": {"name": "constant"},
    "epochs": 2,
    "batch_size": 32,
    "log_every": 1,
    "grad_conflict_every": 0,
    "device": "cpu",
    "seed": 0,
}


def _same_kind(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """False when `new` switches a discriminated block (data.kind) to another kind."""
    return new.get("kind", old.get("kind")) == old.get("kind")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and _same_kind(old, value):
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def config_dict() -> Callable[..., dict[str, Any]]:
    """`config_dict(**overrides)`: BASE_CONFIG deep-merged with the overrides (a plain dict)."""

    def make(**overrides: Any) -> dict[str, Any]:
        return _merge(BASE_CONFIG, overrides)

    return make


@pytest.fixture
def make_config(config_dict: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
    """`make_config(**overrides)`: a validated `TrainConfig` of the tiny learnable dummy run."""
    from mtl.config import TrainConfig

    def make(**overrides: Any) -> TrainConfig:
        return TrainConfig.model_validate(config_dict(**overrides))

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread: far steadier timings on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def write_rows() -> Callable[[Path, Sequence[dict[str, Any]]], Path]:
    """`write_rows(path, rows)`: a CSV (header from the first row) or JSONL file by suffix."""

    def write(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
        if path.suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        return path

    return write


#: Words that decide the labels of `labelled_rows`: sentiment from the first, topic the second.
SENTIMENT_WORDS = {"pos": "wonderful", "neg": "terrible", "neu": "ordinary"}
TOPIC_WORDS = {"sport": "football", "politics": "election"}


@pytest.fixture
def labelled_rows() -> Callable[..., list[dict[str, Any]]]:
    """`labelled_rows(n, missing_topic_row=None)`: rows with `text`, string labels `sentiment`
    (pos/neg/neu) and `topic` (sport/politics); the text holds a word for each label."""

    def make(n: int = 48, missing_topic_row: int | None = None) -> list[dict[str, Any]]:
        sentiments, topics = sorted(SENTIMENT_WORDS), sorted(TOPIC_WORDS)
        rows = []
        for i in range(n):
            s, t = sentiments[i % 3], topics[(i // 3) % 2]
            text = f"a {SENTIMENT_WORDS[s]} story about {TOPIC_WORDS[t]} number {i}"
            rows.append({"text": text, "sentiment": s, "topic": t})
        if missing_topic_row is not None:
            rows[missing_topic_row]["topic"] = ""
        return rows

    return make


#: The shared data sets live next to the checkout: `<repo>/../shared/data/<name>`.
SHARED_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_shared_data(path: Path) -> Path:
    """`path` if it is a directory; else skip the test, or fail it when `CI` is `true` (so a
    CI run cannot silently stop running the tests that need the shared data)."""
    if path.is_dir():
        return path
    message = f"shared data not present: {path} is not a directory"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{message} (CI=true: the shared data must be there)")
    pytest.skip(message)


@pytest.fixture
def shared_data_dir() -> Path:
    """The shared women's clothing reviews data (`train.csv`, `validation.csv`, ...)."""
    return require_shared_data(SHARED_DATA_ROOT / "womens_clothing_reviews")
