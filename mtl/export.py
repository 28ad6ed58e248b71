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
                                      pooling, metrics; `sentence_transformers`: whether the
                                      layout below is there; `onnx` (only with an ONNX export):
                                      {"file", "int8" (file or null), "opset", "inputs",
                                      "outputs"}
    onnx/model.onnx                   with `onnx.export` (default) or `mtl export DIR --onnx`:
                                      encoder, pooling and every head in one graph; inputs
                                      input_ids, attention_mask; outputs each task's logits
                                      (named by the task) and `embedding` (see `mtl.onnx`)
    onnx/model.int8.onnx              the same with int8 weights, only with `onnx.int8`
    modules.json                      the sentence-transformers layout, only when there is a
    sentence_bert_config.json         tokenizer: `SentenceTransformer(model_dir)` loads the
    1_Pooling/config.json             encoder with our pooling (2_Normalize/, empty, with
    2_Normalize/                      `encoder.normalize`) and embeds texts as our
                                      `SentenceEncoder` does; it ignores the heads
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from mtl.config import TrainConfig
from mtl.errors import ModelError
from mtl.layout import MTL_FILE, ONNX_DIR, ONNX_KEY
from mtl.model import MultiTaskModel, load_tokenizer, resolve_model_path

__all__ = ["MTL_FILE", "export_model"]

logger = logging.getLogger(__name__)

#: 1 still: later additions (`task_order`, `sentence_transformers`, `onnx`) are optional keys
#: that readers treat as absent in older folders
FORMAT_VERSION = 1

# sentence-transformers' classic module names and config keys (those of every release since 2.0,
# still read by the current one): the library itself is not needed to write them.
_ST_MODULES = "sentence_transformers.models"
_ST_POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
}


def _write_sentence_transformers_layout(directory: Path, config: TrainConfig, hidden: int) -> None:
    """modules.json (Transformer at the root, Pooling, Normalize when `encoder.normalize`),
    sentence_bert_config.json and 1_Pooling/config.json: what `SentenceTransformer(path)` reads.
    The Transformer module loads config.json, model.safetensors and the tokenizer files."""
    enc = config.encoder
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{_ST_MODULES}.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{_ST_MODULES}.Pooling"},
    ]
    if enc.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": f"{_ST_MODULES}.Normalize"}
        )
        (directory / "2_Normalize").mkdir()  # Normalize has no config; its folder stays empty
    (directory / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    (directory / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": enc.max_length, "do_lower_case": False}, indent=2),
        encoding="utf-8",
    )
    pooling = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    pooling[_ST_POOLING_FLAGS[enc.pooling]] = True
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps(pooling, indent=2), encoding="utf-8"
    )


def _write_onnx(
    directory: Path, model: MultiTaskModel, config: TrainConfig, final: Path
) -> dict[str, Any] | None:
    """The ONNX export (`onnx.export`) into `directory` (the model's temp folder, renamed to
    `final` later), or None: an export that cannot be made (no `onnx` package, an encoder the
    exporter cannot trace) must not cost the trained model, which still predicts with PyTorch;
    a warning says why."""
    if not config.onnx.export:
        return None
    try:
        from mtl.onnx import export_onnx

        return export_onnx(model, directory, int8=config.onnx.int8)
    except Exception as exc:  # an optional artefact: never fail the export for it
        shutil.rmtree(directory / ONNX_DIR, ignore_errors=True)
        logger.warning(
            "the model is exported without its ONNX graph (it predicts with PyTorch; "
            "`mtl export %s --onnx` retries): %s",
            final,
            exc,
        )
        return None


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
        # Without a tokenizer the encoder cannot embed text: no sentence-transformers layout.
        _write_sentence_transformers_layout(tmp, config, model.encoder.hidden_size)
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
    onnx = _write_onnx(tmp, model, config, directory)
    meta = {
        "format_version": FORMAT_VERSION,
        "pooling": config.encoder.pooling,
        "normalize": config.encoder.normalize,
        "max_length": config.encoder.max_length,
        "has_tokenizer": tokenizer is not None,
        "sentence_transformers": tokenizer is not None,
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
        **({ONNX_KEY: onnx} if onnx is not None else {}),
        **(extra or {}),
    }
    (tmp / MTL_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    (tmp / "train_config.json").write_text(config.model_dump_json(indent=1), encoding="utf-8")
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
