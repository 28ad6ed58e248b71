"""FAMO: fast adaptive multitask optimization (Liu, Liu, Jin, Stone and Liu, NeurIPS 2023).

Task logits ``xi`` give weights ``z = softmax(xi)``. The model follows the gradient of
``sum_i z_i log L_i`` rescaled by ``c = 1 / sum_i (z_i / L_i)`` (Algorithm 1), i.e. each task's
loss is weighted by::

    w_i = c * z_i / L_i            (so that sum_i w_i * grad L_i = c * sum_i z_i * grad log L_i)

and ``xi`` learns to favour the tasks whose loss fell least: from one forward to the next, with
``delta_i = log L_i(t-1) - log L_i(t)`` (the log-loss decrease),

    grad_xi = J_softmax(xi)^T delta,     xi <- Adam(xi, grad_xi, lr, weight_decay=gamma)

One backward per step (the losses of step ``t`` serve as the "after" of step ``t-1``, the
variant that needs no second forward). Tasks absent from a step keep their logit; the weights
of the tasks present are renormalised over them. The logits and their Adam state are buffers
(torch's Adam updates them in place), so a checkpoint resumes exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mtl.config import FAMOWeighting

from .base import WeightingStrategy

EPS = 1e-8  # FAMO's floor under the losses (the official code's `min_losses + 1e-8`)


class FAMO(WeightingStrategy):
    xi: Tensor
    prev_log_loss: Tensor
    adam_step: Tensor
    adam_exp_avg: Tensor
    adam_exp_avg_sq: Tensor

    def __init__(self, task_names: list[str], params: FAMOWeighting) -> None:
        super().__init__(task_names)
        self.lr, self.gamma = params.lr, params.gamma
        self.index = {name: i for i, name in enumerate(self.task_names)}
        t = len(self.task_names)
        self.register_buffer("xi", torch.zeros(t))
        self.register_buffer("prev_log_loss", torch.full((t,), math.nan))
        self.register_buffer("adam_step", torch.zeros(()))
        self.register_buffer("adam_exp_avg", torch.zeros(t))
        self.register_buffer("adam_exp_avg_sq", torch.zeros(t))
        self._w = torch.ones(t)

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(losses)
        idx = [self.index[n] for n in names]
        log_loss = torch.stack([losses[n].detach().float().clamp_min(EPS).log() for n in names])
        self._update_logits(idx, log_loss.to(self.xi.device))
        z = torch.softmax(self.xi[idx], dim=0).to(log_loss.device)
        inv = z / log_loss.exp()  # z_i / L_i
        w = inv / inv.sum()  # c * z_i / L_i
        for i, value in zip(idx, w.tolist(), strict=True):
            self._w[i] = value
        return {n: w[k].to(losses[n].dtype) for k, n in enumerate(names)}

    @torch.no_grad()
    def _update_logits(self, idx: list[int], log_loss: Tensor) -> None:
        """One Adam step of the logits on the log-loss decrease since each task's last step,
        then remember this step's log-losses."""
        at = torch.tensor(idx, device=self.xi.device)
        delta = self.prev_log_loss[at] - log_loss
        seen = torch.isfinite(delta)
        if bool(seen.any()):
            full = torch.zeros_like(self.xi)
            full[at] = torch.where(seen, delta, torch.zeros_like(delta))
            with torch.enable_grad():
                xi = self.xi.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=full)
            self._adam_step(grad)
        self.prev_log_loss[at] = log_loss

    def _adam_step(self, grad: Tensor) -> None:
        param = torch.nn.Parameter(self.xi, requires_grad=False)  # shares xi's storage
        param.grad = grad
        opt = torch.optim.Adam(
            [param],
            lr=self.lr,
            weight_decay=self.gamma,
            foreach=False,
            capturable=self.xi.is_cuda,  # the step count stays on the logits' device
        )
        # the state is this module's buffers: Adam updates them in place (saved, resumed)
        opt.state[param] = {
            "step": self.adam_step,
            "exp_avg": self.adam_exp_avg,
            "exp_avg_sq": self.adam_exp_avg_sq,
        }
        opt.step()

    def current_weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self._w.tolist(), strict=True))
