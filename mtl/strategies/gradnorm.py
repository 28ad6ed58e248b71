"""GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018).

Learnable task weights ``w`` (sum ``T``) are moved, once per step, to balance the gradient norms
of the weighted task losses on the shared representation. For the tasks present, with ``g_i``
the unweighted gradient of ``L_i`` and ``L_i(0)`` the task's first observed loss::

    G_i = w_i * ||g_i||,   r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))
    target_i = mean_j(G_j) * r_i ** alpha          (a constant, as in the paper)
    loss_grad = sum_i |G_i - target_i|,   d loss_grad / d w_i = sign(G_i - target_i) * ||g_i||

``w`` takes one Adam step (betas 0.9/0.999, lr ``params.lr``; its own state, not the model
optimizer's) on that gradient, is clamped to ``>= min_weight`` and rescaled so the weights of
the tasks present keep their sum (so ``sum(w) == T``). All state is in buffers.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from mtl.config import GradNormWeighting

from .base import WeightingStrategy


class GradNorm(WeightingStrategy):
    needs_task_grads: ClassVar[bool] = True
    min_weight: ClassVar[float] = 1e-3
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    eps: ClassVar[float] = 1e-8

    w: Tensor
    initial_losses: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor

    def __init__(self, task_names: list[str], params: GradNormWeighting) -> None:
        super().__init__(task_names)
        self.alpha, self.lr = params.alpha, params.lr
        self.index = {name: i for i, name in enumerate(self.task_names)}
        t, f64 = len(self.task_names), torch.float64
        self.register_buffer("w", torch.ones(t, dtype=f64))
        self.register_buffer("initial_losses", torch.full((t,), math.nan, dtype=f64))
        self.register_buffer("exp_avg", torch.zeros(t, dtype=f64))
        self.register_buffer("exp_avg_sq", torch.zeros(t, dtype=f64))
        self.register_buffer("steps", torch.zeros(t, dtype=f64))  # Adam steps, per task

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            name: self.w[self.index[name]].to(loss.device, loss.dtype, copy=True)
            for name, loss in losses.items()
        }

    @torch.no_grad()
    def update_from_grads(self, losses: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        names = [name for name in losses if name in grads]
        dev = self.w.device
        idx = torch.tensor([self.index[name] for name in names], device=dev, dtype=torch.long)
        loss = torch.stack([losses[n].detach().to(dev, torch.float64) for n in names])
        first = torch.isnan(self.initial_losses[idx])
        self.initial_losses[idx] = torch.where(first, loss, self.initial_losses[idx])
        if len(names) < 2:  # nothing to balance
            return
        norms = torch.stack(
            [grads[n].detach().float().norm().to(dev, torch.float64) for n in names]
        )
        w = self.w[idx]
        big_g = w * norms
        ratio = loss / self.initial_losses[idx].clamp_min(1e-12)
        target = big_g.mean() * (ratio / ratio.mean()) ** self.alpha
        grad = torch.sign(big_g - target) * norms

        beta1, beta2 = self.betas
        steps = self.steps[idx] + 1
        m = beta1 * self.exp_avg[idx] + (1 - beta1) * grad
        v = beta2 * self.exp_avg_sq[idx] + (1 - beta2) * grad**2
        m_hat, v_hat = m / (1 - beta1**steps), v / (1 - beta2**steps)
        new_w = (w - self.lr * m_hat / (v_hat.sqrt() + self.eps)).clamp_min(self.min_weight)
        self.w[idx] = new_w * (w.sum() / new_w.sum())
        self.exp_avg[idx], self.exp_avg_sq[idx], self.steps[idx] = m, v, steps

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.w.tolist(), strict=True))
