"""The exported model directory.

model/
    config.json, model.safetensors    the encoder: `transformers.AutoModel.from_pretrained`
    tokenizer files                   `AutoTokenizer.from_pretrained` (when there is one)
    heads.safetensors                 the task heads, keys `<task>.<param>`
    mlm_head.safetensors              the auxiliary MLM head, only with `mlm.export` (a BERT
                                      `cls` head without its output matrix: that is tied to
                                      the encoder's input embeddings)
    mtl.json                          tasks (label names, head configs, dependencies, in
                                      config order; `task_order`: the order heads run in),
                                      pooling, metrics
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mtl.config import TrainConfig
from mtl.errors import ModelError
from mtl.model import MultiTaskModel, load_tokenizer, resolve_model_path

__all__ = ["MTL_FILE", "export_model"]

MTL_FILE = "mtl.json"
FORMAT_VERSION = 1


def export_model(
    directory: Path,
    model: MultiTaskModel,
    tokenizer: Any | None,
    config: TrainConfig,
    label_names: dict[str, list[str]],
    extra: dict[str, Any] | None = None,
    mlm_head: Any | None = None,
) -> Path:
    """Write the model atomically (temp dir, then rename) and return its directory."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.encoder.transformer.save_pretrained(tmp)
    if tokenizer is None and config.encoder.random_init is not None:
        # A random-init encoder trained on token ids: pair it with the tokenizer of
        # `encoder.model` (BERT's vocabulary by default) when that tokenizer fits its vocabulary.
        # Only a local copy (never a hub download at export time).
        local = Path(resolve_model_path(config.encoder.model))
        if local.is_dir():
            try:
                candidate = load_tokenizer(str(local))
                if len(candidate) <= model.encoder.transformer.config.vocab_size:
                    tokenizer = candidate
            except ModelError:
                tokenizer = None
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    heads = {
        f"{task}.{k}": v.detach().cpu().contiguous()
        for task, head in model.heads.items()
        for k, v in head.state_dict().items()
    }
    save_file(heads, str(tmp / "heads.safetensors"))
    if mlm_head is not None:  # `mlm.export`: its output matrix is the encoder's embeddings
        from mtl.mlm import head_state

        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head_state(mlm_head).items()},
            str(tmp / "mlm_head.safetensors"),
        )
    meta = {
        "format_version": FORMAT_VERSION,
        "pooling": config.encoder.pooling,
        "normalize": config.encoder.normalize,
        "max_length": config.encoder.max_length,
        "has_tokenizer": tokenizer is not None,
        "task_order": config.task_order,
        "tasks": [
            {
                "name": t.name,
                "labels": label_names[t.name],
                "head": t.head.model_dump(),
                "depends_on": list(t.depends_on),
                "depends_detach": t.depends_detach,
            }
            for t in config.tasks
        ],
        **(extra or {}),
    }
    (tmp / MTL_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (tmp / "train_config.json").write_text(config.model_dump_json(indent=1), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
