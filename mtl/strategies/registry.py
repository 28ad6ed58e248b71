"""Name -> class registries for the weighting and gradient strategies.

Explicit, like accelerate's ``LOGGER_TYPE_TO_CLASS``: `mtl.strategies` registers every built-in
strategy by name (the names of `mtl.config.WEIGHTING_NAMES` and `GRADIENT_NAMES`). A weighting
class is built as ``cls(task_names, params)`` with its pydantic params model; a gradient class
as ``cls(task_names)``.
"""

from __future__ import annotations

import warnings
from typing import Any

from mtl.config import (
    DWAWeighting,
    FAMOWeighting,
    GradientConfig,
    GradNormWeighting,
    RLWWeighting,
    StaticWeighting,
    SumWeighting,
    UncertaintyWeighting,
)

from .base import GradientStrategy, WeightingStrategy

WeightingParams = (
    SumWeighting
    | StaticWeighting
    | UncertaintyWeighting
    | DWAWeighting
    | RLWWeighting
    | GradNormWeighting
    | FAMOWeighting
)

WEIGHTINGS: dict[str, type[WeightingStrategy]] = {}
GRADIENTS: dict[str, type[GradientStrategy]] = {}


def _register(registry: dict[str, Any], kind: str, name: str, cls: Any, base: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind} {name!r}: {cls!r} is not a subclass of {base.__name__}")
    if name in registry:
        warnings.warn(
            f"{kind} {name!r} is already registered ({registry[name].__name__}); "
            f"replacing it with {cls.__name__}",
            UserWarning,
            stacklevel=3,
        )
    registry[name] = cls


def register_weighting(name: str, cls: type[WeightingStrategy]) -> None:
    """Register a `WeightingStrategy` subclass under `name` (warns when replacing one)."""
    _register(WEIGHTINGS, "weighting", name, cls, WeightingStrategy)


def register_gradient(name: str, cls: type[GradientStrategy]) -> None:
    """Register a `GradientStrategy` subclass under `name` (warns when replacing one)."""
    _register(GRADIENTS, "gradient strategy", name, cls, GradientStrategy)


def build_weighting(params: WeightingParams, task_names: list[str]) -> WeightingStrategy:
    """The weighting strategy named by ``params.name``, built with its params model."""
    cls: Any = WEIGHTINGS.get(params.name)
    if cls is None:
        raise ValueError(f"unknown weighting {params.name!r}; known: {sorted(WEIGHTINGS)}")
    strategy: WeightingStrategy = cls(list(task_names), params)
    return strategy


def build_gradient(config: GradientConfig, task_names: list[str]) -> GradientStrategy:
    """The gradient strategy named by ``config.name`` (``none``: the plain sum)."""
    cls = GRADIENTS.get(config.name)
    if cls is None:
        raise ValueError(f"unknown gradient strategy {config.name!r}; known: {sorted(GRADIENTS)}")
    return cls(list(task_names))
