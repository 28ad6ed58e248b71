"""Dynamic weight average (Liu, Johns and Davison, CVPR 2019: "End-to-end multi-task learning
with attention", eq. 7).

With ``L_i(e)`` the mean training loss of task ``i`` over epoch ``e`` and ``T`` tasks::

    r_i = L_i(e-1) / L_i(e-2),     w_i(e) = T * softmax(r / temperature)_i

and ``w_i = 1`` for the first two epochs. Epoch means are accumulated by `observe` (every
optimizer step) and turned into weights at `end_epoch`. Running sums, counts, the last two epoch
means and the weights are buffers, so a checkpoint resumes exactly. A task with no observed step
in an epoch keeps its previous mean; a ratio that is not finite (no history yet) counts as 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtl.config import DWAWeighting

from .base import WeightingStrategy


class DWA(WeightingStrategy):
    loss_sum: Tensor
    loss_count: Tensor
    history: Tensor
    epochs: Tensor
    w: Tensor

    def __init__(self, task_names: list[str], params: DWAWeighting) -> None:
        super().__init__(task_names)
        self.temperature = params.temperature
        self.index = {name: i for i, name in enumerate(self.task_names)}
        t = len(self.task_names)
        f64 = torch.float64
        self.register_buffer("loss_sum", torch.zeros(t, dtype=f64))
        self.register_buffer("loss_count", torch.zeros(t, dtype=f64))
        # history[0] = L(e-1), history[1] = L(e-2); NaN until that epoch has been seen.
        self.register_buffer("history", torch.full((2, t), math.nan, dtype=f64))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("w", torch.ones(t, dtype=f64))

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: self.w[self.index[name]].to(loss.device, loss.dtype, copy=True)
            for name, loss in losses.items()
        }

    def observe(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            v = float(value)
            if math.isfinite(v):
                self.loss_sum[self.index[name]] += v
                self.loss_count[self.index[name]] += 1

    def end_epoch(self) -> None:
        seen = self.loss_count > 0
        mean = torch.where(seen, self.loss_sum / self.loss_count.clamp_min(1), self.history[0])
        self.history.copy_(torch.stack([mean, self.history[0]]))
        self.epochs += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()
        if int(self.epochs) >= 2:
            r = self.history[0] / self.history[1]
            r = torch.where(torch.isfinite(r), r, torch.ones_like(r))
            self.w.copy_(len(self.task_names) * torch.softmax(r / self.temperature, dim=0))

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist(), strict=True))
