"""The two strategy interfaces the training loop uses.

A *weighting* strategy turns per-task losses into one scalar: ``total = sum_i w_i * L_i + reg``.
It is an ``nn.Module`` so learnable weights (uncertainty, GradNorm) and running statistics
(DWA's epoch losses) live in its ``state_dict`` and are saved in checkpoints.

A *gradient* strategy combines per-task gradients on the shared part of the network into one
gradient (PCGrad's projections, MGDA's min-norm point). The loop hands it a ``[T, D]`` tensor:
one flattened gradient per task, already multiplied by that task's weight. At the
``representation`` level ``D`` is ``batch * hidden`` (the gradient with respect to the pooled
sentence embeddings); at the ``parameters`` level it is the number of encoder parameters.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn


class WeightingStrategy(nn.Module):
    """Base class: equal weights of 1, no regulariser, no state."""

    #: True when `update_from_grads` must be called every step with per-task gradients.
    needs_task_grads: ClassVar[bool] = False

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)

    def weights(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weight of each task present in `losses` for this step (tensors; may carry grad)."""
        return {name: torch.ones((), device=loss.device) for name, loss in losses.items()}

    def regularizer(self, losses: dict[str, Tensor]) -> Tensor | None:
        """A term added to the total loss that does not depend on the model (e.g. log sigma)."""
        return None

    def combine(self, losses: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The total loss and the weights used."""
        w = self.weights(losses)
        total = torch.stack([w[name] * loss for name, loss in losses.items()]).sum()
        reg = self.regularizer(losses)
        if reg is not None:
            total = total + reg
        return total, w

    def observe(self, losses: dict[str, Tensor]) -> None:
        """Called after every forward (micro-batch) with its detached per-task losses."""

    def end_epoch(self) -> None:
        """Called at the end of each epoch."""

    def update_from_grads(self, losses: dict[str, Tensor], grads: dict[str, Tensor]) -> None:
        """GradNorm-style update. `grads[name]` is the unweighted gradient of L_name on the
        shared representation (flattened). Only called when `needs_task_grads` is True."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters to train with the model's optimizer (e.g. uncertainty's log-variances)."""
        return []

    def current_weights(self) -> dict[str, float]:
        """The weights to report (for tasks absent from the last step, their latest value)."""
        return {name: 1.0 for name in self.task_names}


class GradientStrategy:
    """Base class: plain sum of the task gradients."""

    def __init__(self, task_names: list[str]) -> None:
        self.task_names = list(task_names)

    def combine(self, grads: Tensor) -> Tensor:
        """`grads` is ``[T, D]`` (weighted per-task gradients); returns the ``[D]`` update."""
        return grads.sum(dim=0)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None
