"""The baselines' configs, without a stack: what `sum` and `single:<task>` train, and when the
`sum` baseline is the best trial itself (its jobs are reused, nothing is trained twice)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.studies.records import TrialKind, TrialRecord, TrialState
from service.studies.spec import SpaceError, StudyCreate, sampled_config
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


def test_a_search_space_can_switch_every_modeling_option_on(tmp_path: Path) -> None:
    """Every option of issue 12 is a searchable path; a sampled config carries it."""
    from service.studies.spec import check_space
    from worker.study_space import decode, distribution

    data = tmp_path / "t.csv"
    data.write_text("text,task_a,task_b\nx y,0,1\n", encoding="utf-8")
    body = study_body(
        search_space=[
            {"path": "tasks.task_b.depends_on", "choice": [[], ["task_a"]]},
            {"path": "tasks.task_b.depends_detach", "choice": [True, False]},
            {"path": "mlm.weight", "choice": [0.0, 0.5]},
            {"path": "mlm.probability", "float": {"low": 0.1, "high": 0.2}},
            {"path": "optimizer.layer_decay", "float": {"low": 0.7, "high": 1.0}},
            {"path": "averaging.kind", "choice": ["none", "ema", "swa"]},
            {"path": "averaging.ema_decay", "float": {"low": 0.9, "high": 0.999, "log": True}},
            {"path": "averaging.swa_start", "float": {"low": 0.5, "high": 0.9}},
            {"path": "rdrop.alpha", "choice": [0.0, 1.0, 4.0]},
        ]
    )
    body["base"]["data"] = {"kind": "files", "train": str(data)}
    spec = StudyCreate.model_validate(body)
    check_space(spec)
    assert [str(distribution(p).__class__.__name__) for p in spec.search_space][:2] == [
        "CategoricalDistribution", "CategoricalDistribution",
    ]  # fmt: skip
    params = decode(spec, {
        "tasks.task_b.depends_on": '["task_a"]', "tasks.task_b.depends_detach": False,
        "mlm.weight": 0.5, "mlm.probability": 0.12, "optimizer.layer_decay": 0.8,
        "averaging.kind": "swa", "averaging.ema_decay": 0.99, "averaging.swa_start": 0.6,
        "rdrop.alpha": 4.0,
    })  # fmt: skip
    config = sampled_config(spec, params)
    assert config.tasks[1].depends_on == ["task_a"] and not config.tasks[1].depends_detach
    assert config.mlm.enabled and config.mlm.probability == 0.12
    assert config.optimizer.layer_decay == 0.8 and config.rdrop.alpha == 4.0
    assert (config.averaging.kind, config.averaging.swa_start) == ("swa", 0.6)
    # on dummy data any MLM weight above 0 is refused, naming the entry
    dummy = study_body(search_space=[{"path": "mlm.weight", "choice": [0.0, 0.5]}])
    with pytest.raises(SpaceError, match="mlm needs text"):
        check_space(StudyCreate.model_validate(dummy))
