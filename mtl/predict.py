"""Load an exported model directory and classify texts with every task head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from mtl.config import HeadConfig, TaskConfig
from mtl.errors import ModelError
from mtl.export import MTL_FILE
from mtl.model import MultiTaskModel, SentenceEncoder
from mtl.ort_predict import prediction_rows, quiet_transformers

if TYPE_CHECKING:
    from mtl.ensemble import EnsemblePredictor

__all__ = ["Predictor"]


class Predictor:
    """`Predictor.load(model_dir).predict(["a text", ...])` ->
    `[{task: {"label": str, "probabilities": {label: p}}}, ...]`, one dict per text.

    On an ensemble folder (`mtl.ensemble`: mtl.json's `kind` is "ensemble") `load` returns an
    `EnsemblePredictor`, whose `predict` answers the same way."""

    def __init__(self, model: MultiTaskModel, tokenizer: Any, meta: dict[str, Any], device: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.meta = meta
        self.device = torch.device(device)
        self.labels = {t["name"]: t["labels"] for t in meta["tasks"]}
        self.max_length = int(meta["max_length"])

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu") -> Predictor | EnsemblePredictor:
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        try:
            meta = json.loads((model_dir / MTL_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{model_dir}: not an exported mtl model ({exc})") from exc
        if isinstance(meta, dict) and meta.get("kind") == "ensemble":
            from mtl.ensemble import EnsemblePredictor

            return EnsemblePredictor.load(model_dir, device=device)
        try:
            with quiet_transformers():
                transformer = AutoModel.from_pretrained(model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir) if meta["has_tokenizer"] else None
        except (OSError, ValueError) as exc:
            raise ModelError(f"{model_dir}: cannot load the encoder: {exc}") from exc
        tasks = [
            TaskConfig(
                name=t["name"],
                labels=t["labels"],
                head=HeadConfig(**t["head"]),
                depends_on=t.get("depends_on", []),
                depends_detach=t.get("depends_detach", True),
            )
            for t in meta["tasks"]
        ]
        encoder = SentenceEncoder(transformer, meta["pooling"], meta["normalize"])
        model = MultiTaskModel(encoder, tasks)
        heads = load_file(str(model_dir / "heads.safetensors"))
        for task, head in model.heads.items():
            prefix = f"{task}."
            head.load_state_dict(
                {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix)}
            )
        model.to(device)
        return cls(model, tokenizer, meta, device)

    @property
    def task_names(self) -> list[str]:
        return list(self.labels)

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        if self.tokenizer is None:
            raise ModelError("this model was trained without a tokenizer and cannot read text")
        results: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = self.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(
                enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            )
            probs = {t: torch.softmax(v.float(), dim=-1).cpu() for t, v in logits.items()}
            results += prediction_rows(probs, self.labels, len(chunk))
        return results
