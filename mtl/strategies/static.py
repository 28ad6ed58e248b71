"""Fixed task weights: ``total = sum_i w_i * L_i`` with ``w`` given in the config."""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.config import StaticWeighting

from .base import WeightingStrategy


class Static(WeightingStrategy):
    """Weights from ``params.weights`` (one per task), or ``alpha`` for exactly two tasks:
    the first task gets ``alpha``, the second ``1 - alpha``."""

    def __init__(self, task_names: list[str], params: StaticWeighting) -> None:
        super().__init__(task_names)
        if params.alpha is not None:
            if len(self.task_names) != 2:
                raise ValueError("static weighting with alpha needs exactly two tasks")
            self.fixed = dict(zip(self.task_names, (params.alpha, 1.0 - params.alpha), strict=True))
        else:
            assert params.weights is not None  # the config allows exactly one form
            missing = sorted(set(self.task_names) - set(params.weights))
            if missing:
                raise ValueError(f"static weights missing for tasks {missing}")
            self.fixed = {name: float(params.weights[name]) for name in self.task_names}

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: torch.tensor(self.fixed[name], device=loss.device, dtype=loss.dtype)
            for name, loss in losses.items()
        }

    def current_weights(self) -> dict[str, float]:
        return dict(self.fixed)
