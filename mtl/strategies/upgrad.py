"""UPGrad: unconflicting projection of gradients (Quinton and Rey, 2024, "Jacobian Descent for
Multi-Objective Optimization", eq. 3 and Definition 5), from the maintained `torchjd` package.

Each task gradient (a row of the ``[T, D]`` Jacobian) is projected onto the dual cone of all
rows, the cone of directions that conflict with no task, and the projections are averaged::

    pi(g_i) = argmin_{x : x . g_j >= 0 for all j} ||x - g_i||,     A(J) = (1/T) sum_i pi(g_i)

so the update never increases a task's loss to first order. Like `mgda`, the update is scaled
by ``T`` (``sum_i pi(g_i)``) so that its size matches `none`: without conflicts it *is* `none`.
`torchjd` solves the projections in their dual form (a T x T quadratic program on the Gramian
``J J^T``, with quadprog). At the `representation` level that is one encoder backward per
step, at `parameters` one per task.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import UPGrad as _UPGradAggregator

from .base import GradientStrategy


class UPGrad(GradientStrategy):
    def __init__(self, task_names: list[str]) -> None:
        super().__init__(task_names)
        self.aggregator = _UPGradAggregator()

    def combine(self, grads: Tensor) -> Tensor:
        g = grads.float() if grads.dtype in (torch.float16, torch.bfloat16) else grads
        out: Tensor = self.aggregator(g) * g.shape[0]
        return out.to(grads.dtype)
