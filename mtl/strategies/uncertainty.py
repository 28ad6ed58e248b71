"""Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018; LibMTL's ``UW``).

Each task has a learnable log-variance ``s_i = log sigma_i^2`` (initialised to 0). With the
classification form of the paper's loss, ``1/(2 sigma^2) L + log sigma``::

    total = sum_i 0.5 * exp(-s_i) * L_i + sum_i 0.5 * s_i      (sums over the tasks present)

The ``s_i`` are trained by the model's optimizer (see `extra_parameters`), at ``params.lr`` when
that is set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mtl.config import UncertaintyWeighting

from .base import WeightingStrategy


class Uncertainty(WeightingStrategy):
    def __init__(self, task_names: list[str], params: UncertaintyWeighting) -> None:
        super().__init__(task_names)
        self.lr = params.lr  # learning rate of `log_vars`; None: the optimizer's
        self.index = {name: i for i, name in enumerate(self.task_names)}
        self.log_vars = nn.Parameter(torch.zeros(len(self.task_names)))

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """``w_i = 0.5 * exp(-s_i)``; carries the gradient to ``s_i``."""
        return {
            name: (0.5 * torch.exp(-self.log_vars[self.index[name]])).to(loss.device)
            for name, loss in losses.items()
        }

    def regularizer(self, losses: dict[str, Tensor]) -> Tensor | None:
        """``sum_i 0.5 * s_i`` over the tasks present."""
        idx = torch.tensor([self.index[name] for name in losses], device=self.log_vars.device)
        device = next(iter(losses.values())).device if losses else self.log_vars.device
        return (0.5 * self.log_vars[idx].sum()).to(device)

    def extra_parameters(self) -> list[nn.Parameter]:
        return [self.log_vars]

    def current_weights(self) -> dict[str, float]:
        w = (0.5 * torch.exp(-self.log_vars.detach())).tolist()
        return dict(zip(self.task_names, w, strict=True))
