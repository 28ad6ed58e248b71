"""Equal weighting: ``total = sum_i L_i`` (the baseline; LibMTL's ``EW``)."""

from __future__ import annotations

from mtl.config import SumWeighting

from .base import WeightingStrategy


class Sum(WeightingStrategy):
    """Every task present in a step has weight 1; no state, no regulariser."""

    def __init__(self, task_names: list[str], params: SumWeighting | None = None) -> None:
        super().__init__(task_names)
        self.params = params or SumWeighting()
