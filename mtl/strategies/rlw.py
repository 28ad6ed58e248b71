"""Random loss weighting (Lin et al., TMLR 2022: "Reasonable effectiveness of random weighting").

Every call to `weights` draws fresh weights for the ``K`` tasks present in the step::

    w = K * softmax(z),   z ~ N(0, I_K)   (torch's global CPU RNG)

Unlike LibMTL's ``RLW`` (plain softmax, weights summing to 1) the weights are scaled by ``K`` so
they sum to the number of tasks, the same scale as `sum`. The global RNG makes the draws
repeatable under the trainer's RNG save/restore.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl.config import RLWWeighting

from .base import WeightingStrategy


class RLW(WeightingStrategy):
    last: Tensor

    def __init__(self, task_names: list[str], params: RLWWeighting | None = None) -> None:
        super().__init__(task_names)
        self.index = {name: i for i, name in enumerate(self.task_names)}
        self.register_buffer("last", torch.ones(len(self.task_names)))  # for reporting

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(losses)
        w = len(names) * torch.softmax(torch.randn(len(names)), dim=0)
        idx = torch.tensor([self.index[name] for name in names], device=self.last.device)
        self.last[idx] = w.to(self.last.device)
        return {
            name: w[k].to(losses[name].device, losses[name].dtype) for k, name in enumerate(names)
        }

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.last.tolist(), strict=True))
