"""What a study concludes: the scores a job stands for, the baselines' configs, the verdict.

The verdict compares, per task, the best trial with the same settings trained on that task
alone, and with plain `sum` weighting; Delta_MTL (Maninis, Radosavovic and Kokkinos, CVPR
2019) is the mean over tasks of the relative gain of the multi-task model.
"""

from __future__ import annotations

from typing import Any

import optuna

from mtl.config import TrainConfig
from service.store import JobStore
from service.studies.records import (
    StudyRecord,
    TaskVerdict,
    TrialKind,
    TrialRecord,
    TrialState,
    Verdict,
)
from service.studies.spec import Objective, StudyCreate, objective_value, sampled_config

__all__ = ["baseline_config", "importances", "job_report", "verdict"]


def job_report(jobs: JobStore, job_id: str, split: str) -> dict[str, Any] | None:
    """The evaluation report of a job that stands for its exported model: on validation, the
    last evaluation the trainer marked best (its monitor, with `min_delta`); on test, the test
    evaluation of the exported model."""
    evals = [
        e.data
        for e in jobs.metric_history(job_id)
        if e.type == "evaluate" and e.data.get("split", "validation") == split
    ]
    if split == "validation":
        best = [d for d in evals if (d.get("monitor") or {}).get("best")]
        evals = best or evals
    return evals[-1] if evals else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def baseline_config(
    spec: StudyCreate, trial: TrialRecord, variant: dict[str, Any] | None = None
) -> TrainConfig:
    """The best config as a baseline: one task alone (`single:<task>`), or all tasks with
    plain `sum` weighting and no gradient strategy (`sum`)."""
    config = sampled_config(spec, trial.params, variant)
    data = config.model_dump(mode="json")
    data["weighting"] = {"name": "sum"}
    data["gradient"] = {"name": "none"}
    if trial.baseline and trial.baseline.startswith("single:"):
        task = trial.baseline.split(":", 1)[1]
        data["tasks"] = [t for t in data["tasks"] if t["name"] == task]
        scope, _, name = str(data.get("monitor", "mean/macro_f1")).partition("/")
        if scope not in ("mean", task):
            data["monitor"] = f"mean/{name}"
    return TrainConfig.model_validate(data)


def verdict(
    jobs: JobStore, spec: StudyCreate, record: StudyRecord, trials: dict[int, TrialRecord]
) -> Verdict:
    """Per task: the best trial's score, the same settings on that task alone, and with plain
    `sum` (on test when the data has a test split, else on validation)."""
    best = trials[record.best_trial] if record.best_trial is not None else None
    assert best is not None
    split = "test" if job_report(jobs, best.jobs[0], "test") else "validation"
    metric = spec.objective.metric
    baselines = {t.baseline: t for t in trials.values() if t.kind is TrialKind.BASELINE}
    names = sampled_config(spec, record.best_params or {}).task_names

    def score(trial: TrialRecord | None, task: str) -> float | None:
        if trial is None or trial.state is not TrialState.COMPLETE:
            return None
        labels = (spec.objective.labels or {}).get(task)
        one = Objective(
            metric=metric, tasks=[task], labels={task: labels} if labels else None,
            direction=spec.objective.direction,
        )  # fmt: skip
        values = [
            objective_value(job_report(jobs, job_id, split) or {}, one) for job_id in trial.jobs
        ]
        return _mean([v for v in values if v is not None])

    tasks: dict[str, TaskVerdict] = {}
    gains = []
    sign = 1.0 if spec.objective.maximize else -1.0
    for task in names:
        mt = score(best, task)
        st = score(baselines.get(f"single:{task}"), task)
        tasks[task] = TaskVerdict(
            multi_task=mt,
            single_task=st,
            difference=None if mt is None or st is None else mt - st,
            sum=score(baselines.get("sum"), task),
        )
        if mt is not None and st:
            gains.append(sign * (mt - st) / st)
    sum_trial = baselines.get("sum")
    return Verdict(
        split=split,
        metric=metric,
        tasks=tasks,
        delta_mtl=100 * sum(gains) / len(gains) if gains and len(gains) == len(names) else None,
        objective_best=record.best_value,
        objective_sum=sum_trial.value if sum_trial is not None else None,
    )


def importances(study: optuna.Study) -> dict[str, float] | None:
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # too few complete trials, or nothing varied
        return None
