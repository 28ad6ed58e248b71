"""Loaded models for `POST /v1/jobs/{id}/predict`: a small LRU cache, used from threads.

Prediction runs in the API process (in worker threads, never on the event loop), so it never
waits behind a training job in the queue. torch is imported on first use only.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["PredictorCache"]


class _Entry:
    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.lock = threading.Lock()  # tokenizers are not safe to share across threads


class PredictorCache:
    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, float], _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, float], threading.Lock] = {}

    def _entry(self, model_dir: Path) -> _Entry:
        key = (str(model_dir), (model_dir / "mtl.json").stat().st_mtime)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # one load per model, however many requests arrive at once
            with self._lock:
                entry = self._entries.get(key)
            if entry is None:
                from mtl.predict import Predictor

                entry = _Entry(Predictor.load(model_dir, device="cpu"))
                gc.freeze()  # torch and the model: long-lived, keep them out of full GC passes
                with self._lock:
                    self._entries[key] = entry
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.size:
                        self._entries.popitem(last=False)
                    self._loading.pop(key, None)
        return entry

    def predict(self, model_dir: Path, texts: list[str]) -> list[dict[str, Any]]:
        entry = self._entry(model_dir)
        with entry.lock:
            return entry.predictor.predict(texts)

    def evict(self, model_dir: Path) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == str(model_dir)]:
                del self._entries[key]
