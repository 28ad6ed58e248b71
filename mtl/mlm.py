"""The auxiliary masked-language-model task (config `mlm`, off while its weight is 0).

Each micro-batch of the classification tasks is followed by one MLM batch: texts drawn from a
pool (the training texts, plus `mlm.data`'s unlabeled texts when given), masked by
transformers' `DataCollatorForLanguageModeling` (BERT's rule: of the chosen tokens 80 % become
[MASK], 10 % a random token, 10 % stay), run through the shared transformer and an MLM head;
the loss is cross-entropy over the chosen tokens, added to the combined task loss times
`mlm.weight`. The head is the checkpoint's own when it has one (`AutoModelForMaskedLM` finds
its weights), else a new BERT MLM head whose output matrix is tied to the input embeddings.

Determinism: the pool's order is a permutation per pass (seeded by the run's seed and the
pass), and each batch's mask comes from a generator seeded by the seed and the batch's index,
so batch `i` is the same on every run and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl.errors import ModelError

__all__ = ["MLMBatches", "build_mlm_head", "head_state", "load_head_state", "mlm_loss"]

TIED = "predictions.decoder.weight"  # the output matrix: the input embeddings themselves


def _checkpoint_head(source: str) -> nn.Module | None:
    """The checkpoint's own BERT MLM head (`cls`), when its weights are in the checkpoint."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            source, output_loading_info=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError):
        return None
    finally:
        hf_logging.set_verbosity(level)
    head = getattr(model, "cls", None)
    missing = [k for k in info.get("missing_keys", ()) if k.startswith("cls.")]
    if head is None or missing:
        return None
    return head


def build_mlm_head(transformer: Any, source: str | None) -> nn.Module:
    """The MLM head for `transformer` (a BERT-family encoder), tied to its input embeddings.

    `source`: the pretrained checkpoint's directory (None for a random-init encoder)."""
    config = transformer.config
    if getattr(config, "model_type", None) != "bert":
        raise ModelError(
            f"mlm: the encoder is a {getattr(config, 'model_type', '?')!r} model; the auxiliary "
            "MLM task supports BERT-family encoders"
        )
    head = _checkpoint_head(source) if source is not None else None
    if head is None:
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        head = BertOnlyMLMHead(config)
        std = float(getattr(config, "initializer_range", 0.02))
        for module in head.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    decoder: Any = getattr(head, "predictions").decoder  # noqa: B009 (typed Any on purpose)
    decoder.weight = transformer.get_input_embeddings().weight
    return head


def head_state(head: nn.Module) -> dict[str, Tensor]:
    """The head's own tensors (the tied output matrix is the encoder's, saved with it)."""
    return {k: v for k, v in head.state_dict().items() if k != TIED}


def load_head_state(head: nn.Module, state: dict[str, Tensor]) -> None:
    missing, unexpected = head.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != TIED]:
        raise ModelError(f"the MLM head does not match: missing {missing}, extra {unexpected}")


class MLMBatches:
    """Masked batches from a pool of token-id sequences (special tokens included)."""

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        tokenizer: Any,
        *,
        batch_size: int,
        probability: float,
        seed: int,
    ) -> None:
        from transformers import DataCollatorForLanguageModeling

        if getattr(tokenizer, "mask_token", None) is None:
            raise ModelError("mlm: the tokenizer has no mask token, so there is nothing to mask")
        self.sequences = [list(s) for s in sequences if len(s) > 2]
        if not self.sequences:
            raise ModelError("mlm: no text to mask (every text is empty after tokenising)")
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=probability)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.batch_size = min(batch_size, len(self.sequences))
        self.seed = seed
        self.per_pass = math.ceil(len(self.sequences) / self.batch_size)
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.sequences)

    def _rows(self, index: int) -> np.ndarray:
        pass_no, k = divmod(index, self.per_pass)
        if self._order is None or self._order[0] != pass_no:
            rng = np.random.default_rng([self.seed, pass_no])
            self._order = (pass_no, rng.permutation(len(self.sequences)))
        return self._order[1][k * self.batch_size : (k + 1) * self.batch_size]

    def batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Batch `index`: masked input ids, attention mask, labels (-100 where not masked)."""
        rows = [self.sequences[i] for i in self._rows(index)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        special = torch.isin(ids, self.special) | (mask == 0)
        self.collator.generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + index) % 2**63
        )
        masked, labels = self.collator.torch_mask_tokens(ids.clone(), special_tokens_mask=special)
        return masked, mask, labels


def mlm_loss(
    transformer: Any, head: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor
) -> tuple[Tensor, int, int] | None:
    """Cross-entropy over the masked tokens, how many the head got right, how many there were
    (None when the batch has no masked token)."""
    chosen = labels != -100
    count = int(chosen.sum())
    if count == 0:
        return None
    hidden = transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = head(hidden[chosen]).float()
    target = labels[chosen]
    loss = F.cross_entropy(logits, target)
    correct = int((logits.detach().argmax(-1) == target).sum())
    return loss, correct, count
