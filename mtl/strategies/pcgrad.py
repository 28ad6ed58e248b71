"""PCGrad: gradient surgery for multi-task learning (Yu et al., NeurIPS 2020, Algorithm 1).

For each task ``i``, visiting the other tasks ``j`` in a random order (``torch.randperm``, the
global CPU RNG), a conflicting gradient is projected onto the normal plane of the *original*
``g_j``::

    if g_i' . g_j < 0:   g_i' <- g_i' - (g_i' . g_j) / ||g_j||^2 * g_j

and the update is ``sum_i g_i'``. The branch is written as ``min(g_i' . g_j, 0)``, so there is
no device sync; the arithmetic runs in at least float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientStrategy


class PCGrad(GradientStrategy):
    def combine(self, grads: Tensor) -> Tensor:
        g = grads.float() if grads.dtype in (torch.float16, torch.bfloat16) else grads
        sq_norms = (g * g).sum(dim=1).clamp_min(torch.finfo(g.dtype).tiny)
        projected = g.clone()
        t = g.shape[0]
        for i in range(t):
            for j in torch.randperm(t).tolist():
                if j == i:
                    continue
                dot = torch.dot(projected[i], g[j]).clamp(max=0.0)
                projected[i] -= dot / sq_norms[j] * g[j]
        return projected.sum(dim=0).to(grads.dtype)
