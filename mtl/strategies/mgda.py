"""MGDA: the min-norm point in the convex hull of the task gradients (Desideri 2012; Sener and
Koltun, NeurIPS 2018: "Multi-task learning as multi-objective optimization").

With ``M = G G^T`` (float64) we solve ``min_a a^T M a`` over the simplex: in closed form for two
tasks, ``a_1 = clip((M_22 - M_12) / (M_11 + M_22 - 2 M_12), 0, 1)``; for more, by projected
gradient descent (step ``1 / (2 lambda_max(M))``, at most `max_iter` steps, stopping early once
``a`` no longer changes). The update is ``T * sum_i a_i g_i``: scaled by ``T`` so its size is
comparable to the plain sum of ``T`` gradients.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import GradientStrategy


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto ``{a : a >= 0, sum a = 1}`` (Duchi et al., ICML 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, dim=0) - 1.0
    k = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - css / k > 0).max())
    return (v - css[rho] / (rho + 1)).clamp_min(0.0)


def min_norm_weights(gram: Tensor, max_iter: int = 2000, tol: float = 1e-12) -> Tensor:
    """The simplex weights ``a`` minimising ``a^T gram a`` (``gram`` is ``[T, T]``, on CPU)."""
    t = gram.shape[0]
    if t == 1:
        return torch.ones(1, dtype=gram.dtype)
    if t == 2:
        denom = gram[0, 0] + gram[1, 1] - 2 * gram[0, 1]
        if denom <= 0:  # identical gradients: any mix is optimal
            return torch.full((2,), 0.5, dtype=gram.dtype)
        a0 = ((gram[1, 1] - gram[0, 1]) / denom).clamp(0.0, 1.0)
        return torch.stack([a0, 1 - a0])
    lipschitz = 2 * torch.linalg.eigvalsh(gram)[-1]
    a = torch.full((t,), 1.0 / t, dtype=gram.dtype)
    if lipschitz <= 0:  # all gradients zero
        return a
    for _ in range(max_iter):
        nxt = project_simplex(a - (2 * gram @ a) / lipschitz)
        if (nxt - a).abs().max() <= tol:
            return nxt
        a = nxt
    return a


def gram_matrix(grads: Tensor, chunk: int = 1 << 20) -> Tensor:
    """``G G^T`` in float64, a chunk of columns at a time (bounded extra memory)."""
    gram = torch.zeros(grads.shape[0], grads.shape[0], dtype=torch.float64, device=grads.device)
    for part in grads.split(chunk, dim=1):
        part = part.double()
        gram += part @ part.T
    return gram


class MGDA(GradientStrategy):
    max_iter: ClassVar[int] = 2000

    def combine(self, grads: Tensor) -> Tensor:
        alpha = min_norm_weights(gram_matrix(grads).cpu(), self.max_iter)
        work = torch.promote_types(grads.dtype, torch.float32)
        scaled = (grads.shape[0] * alpha).to(grads.device, work)
        return (scaled @ grads.to(work)).to(grads.dtype)
