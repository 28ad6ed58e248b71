"""A study's search space as Optuna sees it: distributions, the sampler and the pruner."""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from service.studies.spec import SearchParam, StudyCreate

__all__ = ["decode", "distribution", "make_pruner", "make_sampler"]


def _primitive(values: list[Any]) -> bool:
    return all(v is None or isinstance(v, bool | int | float | str) for v in values)


def distribution(param: SearchParam) -> BaseDistribution:
    if param.float is not None:
        f = param.float
        return FloatDistribution(f.low, f.high, log=f.log, step=f.step)
    if param.int is not None:
        i = param.int
        return IntDistribution(i.low, i.high, log=i.log, step=i.step)
    assert param.choice is not None
    choices: list[Any] = (
        list(param.choice) if _primitive(param.choice) else [json.dumps(c) for c in param.choice]
    )
    return CategoricalDistribution(choices)


def decode(spec: StudyCreate, params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's params as config values (choices that are lists or objects travel as JSON)."""
    out = dict(params)
    for param in spec.search_space:
        if param.choice is not None and not _primitive(param.choice) and param.path in out:
            out[param.path] = json.loads(out[param.path])
    return out


def make_sampler(spec: StudyCreate) -> optuna.samplers.BaseSampler:
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return _Grid({p.path: _grid(p) for p in spec.search_space}, seed=spec.seed)
    startup = max(2, min(10, spec.budget.trials // 3))
    return optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)


class _Grid(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its `study.stop()` once the grid is covered: that call is
    meant for `study.optimize` loops; here the driver ends the search (the budget is capped at
    the grid's size on submit)."""

    def after_trial(self, *args: Any, **kwargs: Any) -> None:
        return None


def _grid(param: SearchParam) -> list[Any]:
    if param.int is not None:
        return list(range(param.int.low, param.int.high + 1, param.int.step))
    assert param.choice is not None
    dist = distribution(param)
    assert isinstance(dist, CategoricalDistribution)
    return list(dist.choices)


def make_pruner(spec: StudyCreate) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()
