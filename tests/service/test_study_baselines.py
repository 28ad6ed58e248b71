"""The baselines' configs, without a stack: what `sum` and `single:<task>` train, and when the
`sum` baseline is the best trial itself (its jobs are reused, nothing is trained twice)."""

from __future__ import annotations

from service.studies.records import TrialKind, TrialRecord, TrialState
from service.studies.spec import StudyCreate, sampled_config
from tests.service.test_studies import study_body
from worker.studies import StudyDriver
from worker.study_verdict import baseline_config


def trial(params: dict[str, object], baseline: str | None = None) -> TrialRecord:
    return TrialRecord(
        number=0 if baseline is None else 1000,
        kind=TrialKind.SEARCH if baseline is None else TrialKind.BASELINE,
        baseline=baseline, params=params, state=TrialState.COMPLETE, started_at=0.0,
    )  # fmt: skip


def test_baseline_configs_keep_the_best_settings_and_change_only_what_they_name() -> None:
    spec = StudyCreate.model_validate(study_body())
    params = {"optimizer.lr": 0.003, "weighting.name": "famo"}
    best = sampled_config(spec, params)
    summed = baseline_config(spec, trial(params, "sum"))
    assert best.weighting.name == "famo" and summed.weighting.name == "sum"
    assert summed.gradient.name == "none" and summed.optimizer.lr == 0.003
    alone = baseline_config(spec, trial(params, "single:task_b"))
    assert alone.task_names == ["task_b"] and alone.optimizer.lr == 0.003


def test_the_sum_baseline_is_the_best_trial_when_that_already_summed() -> None:
    spec = StudyCreate.model_validate(study_body())
    assert StudyDriver._same_as_best(
        spec, trial({"optimizer.lr": 0.003, "weighting.name": "sum"}), "sum"
    )
    assert not StudyDriver._same_as_best(
        spec, trial({"optimizer.lr": 0.003, "weighting.name": "famo"}), "sum"
    )
    # single-task baselines always train; a best trial that did not complete is not reused
    assert not StudyDriver._same_as_best(
        spec, trial({"optimizer.lr": 0.003, "weighting.name": "sum"}), "single:task_a"
    )
    failed = trial({"optimizer.lr": 0.003, "weighting.name": "sum"})
    failed.state = TrialState.FAILED
    assert not StudyDriver._same_as_best(spec, failed, "sum")
    # a gradient strategy in the base config makes the best trial differ from `sum`
    body = study_body()
    body["base"]["gradient"] = {"name": "pcgrad"}
    spec = StudyCreate.model_validate(body)
    assert not StudyDriver._same_as_best(
        spec, trial({"optimizer.lr": 0.003, "weighting.name": "sum"}), "sum"
    )
