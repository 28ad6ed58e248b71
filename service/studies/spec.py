"""A study request: a base config, a search space over config paths, an objective, a budget.

A search-space entry names a path of the training config (`optimizer.encoder_lr`,
`weighting.name`, `tasks.<task name>.class_weights`: tasks are addressed by name) and one of
a float range, an int range or a list of choices. `check_space` proves on submit that every
path exists in the config schema and that the base config stays valid at each end of every
range and with every choice; each sampled config is validated again, strictly, before its job
is created (`sampled_config`).

The objective is computed from an evaluation report (the trainer's `on_evaluate` payload,
kept in a job's metric history) by `objective_value`: one metric, per task or a weighted mean
over tasks, optionally macro-F1 over a subset of a task's labels.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mtl.config import TrainConfig
from service.configs import parse_strict

__all__ = [
    "Baselines",
    "Budget",
    "FloatRange",
    "IntRange",
    "Objective",
    "SearchParam",
    "Selection",
    "SpaceError",
    "StudyCreate",
    "apply_params",
    "check_space",
    "corners",
    "objective_value",
    "sampled_config",
]

PATH_PATTERN = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatRange(_Strict):
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError("needs finite low <= high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("a log range needs low > 0 and no step")
        return self


class IntRange(_Strict):
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> IntRange:
        if self.low > self.high:
            raise ValueError("needs low <= high")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError("a log range needs low >= 1 and step 1")
        return self


Choice = str | int | float | bool | None | list[Any] | dict[str, Any]


class SearchParam(_Strict):
    """One dimension of the search: a config path and exactly one of `float`, `int`, `choice`."""

    path: str = Field(
        ..., min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"
    )
    float: FloatRange | None = None
    int: IntRange | None = None
    choice: list[Choice] | None = Field(None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_kind(self) -> SearchParam:
        kinds = [k for k in ("float", "int", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of `float`, `int` or `choice`")
        return self


class Objective(_Strict):
    """What the search optimises, on validation: `metric` of one task, or the (weighted) mean
    over `tasks` (default: all tasks, equal weights). `labels` restricts macro-F1 of a task to
    some of its labels (e.g. leave a "none" class out)."""

    metric: Literal["macro_f1", "weighted_f1", "accuracy", "loss"] = "macro_f1"
    tasks: list[str] | None = Field(None, min_length=1)
    weights: dict[str, float] | None = None
    labels: dict[str, list[str]] | None = None
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="default: minimize for loss, maximize otherwise"
    )

    @property
    def maximize(self) -> bool:
        if self.direction is not None:
            return self.direction == "maximize"
        return self.metric != "loss"

    @model_validator(mode="after")
    def _consistent(self) -> Objective:
        if self.labels and self.metric != "macro_f1":
            raise ValueError("`labels` applies to macro_f1 only")
        for task, w in (self.weights or {}).items():
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"the weight of {task!r} must be finite and >= 0")
        if self.weights is not None and sum(self.weights.values()) <= 0:
            raise ValueError("the weights must not all be 0")
        return self


class Budget(_Strict):
    trials: int = Field(12, ge=1, le=500, description="configurations to try")
    parallel: int = Field(2, ge=1, le=32, description="trials running at once")
    timeout_s: float | None = Field(
        None, gt=0, description="no new trial starts after this many seconds"
    )
    max_failures: int = Field(3, ge=0, le=500, description="failed trials tolerated")


class Selection(_Strict):
    """How one configuration is scored: one run (`single`); the mean over `seeds` runs; or the
    mean over `folds` runs of k-fold cross-validation on train + validation pooled (file data;
    see `mtl.config.Folds`). With several runs the spread is reported too: on small data one
    validation split of a few hundred rows picks noise."""

    kind: Literal["single", "seeds", "folds"] = "single"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=2, max_length=10)
    folds: int = Field(5, ge=2, le=10, description="k, for kind `folds`")

    def variants(self) -> list[dict[str, Any]]:
        """The config changes of each run of one configuration."""
        if self.kind == "seeds":
            return [{"seed": seed} for seed in self.seeds]
        if self.kind == "folds":
            return [{"data.folds": {"k": self.folds, "index": i}} for i in range(self.folds)]
        return [{}]


class Baselines(_Strict):
    single_task: bool = Field(True, description="each task alone, with the best hyperparameters")
    sum: bool = Field(True, description="the best config with plain `sum` and no gradient strategy")


class StudyCreate(_Strict):
    name: str | None = Field(None, max_length=200)
    base: dict[str, Any] = Field(..., description="a training config (the body of POST /v1/jobs)")
    search_space: list[SearchParam] = Field(..., min_length=1, max_length=50)
    objective: Objective = Field(default_factory=Objective)
    budget: Budget = Field(default_factory=Budget)
    selection: Selection = Field(default_factory=Selection)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["none", "median", "successive_halving"] = "median"
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the sampler's seed")
    baselines: Baselines = Field(default_factory=Baselines)


class SpaceError(ValueError):
    """A study request the service cannot run; `loc` names the field (as in a 422)."""

    def __init__(self, message: str, loc: list[str | int]) -> None:
        super().__init__(message)
        self.loc = loc


# ---------------------------------------------------------------------------- config paths


def _schema() -> tuple[dict[str, Any], dict[str, Any]]:
    schema = TrainConfig.model_json_schema()
    return schema, schema.get("$defs", {})


def _branches(node: dict[str, Any], defs: dict[str, Any]) -> list[dict[str, Any]]:
    """The concrete object/array schemas `node` may be ($ref and unions resolved)."""
    if "$ref" in node:
        return _branches(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            return [b for sub in node[key] for b in _branches(sub, defs)]
    return [node]


def _path_in_schema(parts: list[str], node: dict[str, Any], defs: dict[str, Any]) -> bool:
    if not parts:
        return True
    for branch in _branches(node, defs):
        # an array is addressed by an element's name (tasks.<name>....)
        items = branch.get("items") if branch.get("type") == "array" else None
        if items is not None and _path_in_schema(parts[1:], items, defs):
            return True
        props = branch.get("properties", {})
        if parts[0] in props and _path_in_schema(parts[1:], props[parts[0]], defs):
            return True
    return False


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with each `path -> value` set. `tasks.<name>` addresses the task of that name.
    Setting the `name` of a block whose current name differs (`weighting.name: dwa` on a
    `static` block) replaces the block by `{"name": value}`: the other fields belonged to the
    old kind. Names are applied first, so other sampled fields of the block survive."""
    config = copy.deepcopy(dict(base))
    ordered = sorted(params.items(), key=lambda kv: not kv[0].endswith(".name"))
    for path, value in ordered:
        parts = path.split(".")
        target: Any = config
        for i, part in enumerate(parts[:-1]):
            if isinstance(target, list):
                found = [t for t in target if isinstance(t, dict) and t.get("name") == part]
                if not found:
                    raise KeyError(f"no task named {part!r}")
                target = found[0]
                continue
            nxt = target.get(part)
            if nxt is None:
                nxt = target[part] = {}
            elif not isinstance(nxt, dict | list):
                raise KeyError(f"{'.'.join(parts[: i + 1])} is not a block")
            target = nxt
        last = parts[-1]
        if isinstance(target, list):
            raise KeyError(f"{path}: name a field of the task")
        if last in ("name", "kind") and target.get(last) not in (None, value):
            target.clear()
        target[last] = copy.deepcopy(value)
    return config


def corners(param: SearchParam) -> list[Any]:
    """The values at the ends of a range, or every choice: what a submit checks."""
    if param.float is not None:
        return [param.float.low, param.float.high]
    if param.int is not None:
        return [param.int.low, param.int.high]
    assert param.choice is not None
    return list(param.choice)


def check_space(study: StudyCreate) -> TrainConfig:
    """The base config, parsed; raises `SpaceError` naming the field when the base config,
    a path, a range end or a choice, or the objective cannot be used."""
    try:
        base = parse_strict(TrainConfig, study.base)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        raise SpaceError(err["msg"], ["body", "base", *err["loc"]]) from None
    schema, defs = _schema()
    task_names = set(base.task_names)
    seen: set[str] = set()
    for i, param in enumerate(study.search_space):
        loc: list[str | int] = ["body", "search_space", i, "path"]
        parts = param.path.split(".")
        if param.path in seen:
            raise SpaceError(f"{param.path} is searched twice", loc)
        seen.add(param.path)
        if not _path_in_schema(parts, schema, defs):
            raise SpaceError(f"{param.path} is not a field of the training config", loc)
        if parts[0] == "tasks" and (len(parts) < 3 or parts[1] not in task_names):
            raise SpaceError(
                f"{param.path}: tasks are addressed by name, tasks.<name>.<field>; the tasks "
                f"are {', '.join(sorted(task_names))}",
                loc,
            )
        kind = "float" if param.float else "int" if param.int else "choice"
        for j, value in enumerate(corners(param)):
            where: list[str | int] = ["body", "search_space", i, kind]
            if kind == "choice":
                where.append(j)
            try:
                parse_strict(TrainConfig, apply_params(study.base, {param.path: value}))
            except (KeyError, ValidationError) as exc:
                why = _reason(exc)
                raise SpaceError(
                    f"{param.path} = {value!r} makes the config invalid: {why}", where
                ) from None
    if study.selection.kind == "folds" and base.data.kind != "files":
        raise SpaceError("k-fold selection needs file data", ["body", "selection", "kind"])
    _check_objective(study.objective, base)
    return base


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)


def _check_objective(objective: Objective, base: TrainConfig) -> None:
    names = base.task_names
    for field, tasks in (
        ("tasks", objective.tasks or []),
        ("weights", list(objective.weights or {})),
        ("labels", list(objective.labels or {})),
    ):
        for task in tasks:
            if task not in names:
                raise SpaceError(
                    f"no task {task!r}; the tasks are {', '.join(names)}",
                    ["body", "objective", field],
                )
    for task, labels in (objective.labels or {}).items():
        config = next(t for t in base.tasks if t.name == task)
        known = config.labels or [str(i) for i in range(config.n_classes)]
        unknown = [label for label in labels if label not in known]
        if unknown or not labels:
            raise SpaceError(
                f"task {task!r} has no label {', '.join(map(repr, unknown))}; its labels are "
                f"{', '.join(known)}"
                if unknown
                else f"task {task!r}: name at least one label",
                ["body", "objective", "labels", task],
            )


def sampled_config(
    study: StudyCreate, params: Mapping[str, Any], variant: Mapping[str, Any] | None = None
) -> TrainConfig:
    """The config of one run of a trial (`variant`: one of `Selection.variants()`), validated
    like a job body (`ValidationError`)."""
    return parse_strict(TrainConfig, apply_params(study.base, {**params, **(variant or {})}))


# ------------------------------------------------------------------------------- objective


def objective_value(report: Mapping[str, Any], objective: Objective) -> float | None:
    """The objective of one evaluation report (None when it has none of the tasks)."""
    tasks: dict[str, Any] = report.get("tasks") or {}
    chosen = objective.tasks or list(tasks)
    weights = objective.weights or {t: 1.0 for t in chosen}
    total = weight_sum = 0.0
    for task in chosen:
        values = tasks.get(task)
        w = weights.get(task, 0.0)
        if values is None or w == 0:
            continue
        subset = (objective.labels or {}).get(task)
        if subset:
            per_class = values.get("per_class") or {}
            f1s = [per_class[label]["f1"] for label in subset if label in per_class]
            if not f1s:
                continue
            value = sum(f1s) / len(f1s)
        elif objective.metric in values:
            value = float(values[objective.metric])
        else:
            continue
        total += w * value
        weight_sum += w
    return total / weight_sum if weight_sum else None
