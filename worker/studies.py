"""The study driver: a thread in every worker's main process that moves studies on.

Every `poll_s` it looks at the active studies (`{p}:studies:active`). For each one it can take
the study's lease for (one driver at a time: the others skip it; when a worker dies its lease
lapses and another takes over), it makes one pass:

1. **Follow** each unfinished trial: its jobs are ordinary jobs (same owner, `study_id` and
   `trial` on the record). New validation evaluations in the first job's metric history are
   reported to Optuna's pruner (`trial.report`); when it says prune, the trial's jobs are
   cancelled. A trial whose jobs have all ended is told to Optuna (complete with the objective
   of its best-checkpoint evaluation, the mean over its jobs when it has several (seeds or
   folds); failed;
   or pruned) exactly once: Optuna's own state of the trial says whether it was told already.
2. **Cancel**, when asked: no new trial, every running trial's jobs cancelled; the study is
   cancelled once they have ended.
3. **Launch** trials while fewer than `parallel` run, the budget has trials left, the failures
   are within budget and the time limit has not passed: `study.ask()`, the sampled config
   validated like a job body, then its jobs created (one, or one per seed or fold).
4. **Baselines**, once the search is over: with the best trial's hyperparameters, each task
   alone and the multi-task model with plain `sum` and no gradient strategy; then the verdict.

Exactly once, whatever dies: a trial's record is saved before its jobs are created, and each
job is created under an idempotency key of (study, trial, run), so a pass that repeats the
creation after a crash finds the same job; an Optuna trial asked but never recorded (a crash
between the two) is adopted by the next pass instead of asking a new one; telling checks
Optuna's trial state first. Jobs themselves survive worker loss as any job does (lease, reaper,
resume from the checkpoint).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState as OptunaState
from pydantic import ValidationError

from mtl.config import TrainConfig
from service.queue import routing
from service.records import JobRecord, JobState
from service.settings import Settings
from service.store import CreateOutcome, JobStore, NewJob
from service.studies.records import (
    STUDY_TERMINAL,
    TRIAL_FINAL,
    StudyRecord,
    StudyState,
    TrialKind,
    TrialRecord,
    TrialState,
)
from service.studies.spec import (
    StudyCreate,
    objective_value,
    sampled_config,
)
from service.studies.store import StudyStore
from worker.optuna_journal import journal_storage
from worker.study_space import decode, distribution, make_pruner, make_sampler
from worker.study_verdict import baseline_config, importances, job_report, verdict

__all__ = ["StudyDriver"]

log = logging.getLogger(__name__)

BASELINE_FIRST = 1000  # baseline trials are numbered from here (search trials from 0)
STUDY_JOB_TTL_S = 90 * 24 * 3600  # how long a trial's job stays findable by its key


# ---------------------------------------------------------------------------------- driver


class StudyDriver(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        studies: StudyStore,
        publish: Callable[[str, int, str | None], Any],
        *,
        poll_s: float = 0.25,
        lease_ms: int = 10_000,
    ) -> None:
        super().__init__(name="mtl-studies", daemon=True)
        self.settings = settings
        self.jobs = jobs
        self.studies = studies
        self.publish = publish
        self.poll_s = poll_s
        self.lease_ms = lease_ms
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._optuna: dict[str, optuna.Study] = {}
        self._halt = threading.Event()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.pass_once()
            except Exception:
                log.warning("study driver pass failed", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)

    def pass_once(self) -> None:
        for study_id in self.studies.active():
            if not self.studies.acquire(study_id, self.token, self.lease_ms):
                self._optuna.pop(study_id, None)  # another driver has it: replay when back
                continue
            try:
                self.step(study_id)
            except Exception:
                log.exception("study %s: pass failed", study_id)

    # ------------------------------------------------------------------------------ one pass
    def step(self, study_id: str) -> None:
        got = self.studies.get(study_id)
        if got is None:
            self.studies.finished(study_id)
            return
        record, spec, cancel = got
        if record.state in STUDY_TERMINAL:
            self.studies.finished(study_id)
            return
        study = self._study(study_id, spec)
        trials = self.studies.trials(study_id)
        if record.state is StudyState.QUEUED:
            record.started_at = time.time()
            self._set_state(record, StudyState.SEARCHING)
        for trial in trials.values():
            if trial.state not in TRIAL_FINAL:
                self._follow(study, spec, record, trial, cancel)
        self._best(spec, record, trials)
        if cancel:
            self._cancel(record, trials)
        elif record.state is StudyState.SEARCHING:
            self._search(study, spec, record, trials)
        if record.state is StudyState.BASELINES:
            self._baselines(spec, record, trials)
        self._count(record, trials)
        self.studies.save(record)
        if record.state in STUDY_TERMINAL:
            self.studies.finished(study_id)
            self._optuna.pop(study_id, None)

    def _study(self, study_id: str, spec: StudyCreate) -> optuna.Study:
        study = self._optuna.get(study_id)
        if study is None:
            storage = journal_storage(
                self.settings.require_redis_url(), self.jobs.keys.study_optuna(study_id)
            )
            study = optuna.create_study(
                storage=storage,
                study_name=study_id,
                direction="maximize" if spec.objective.maximize else "minimize",
                sampler=make_sampler(spec),
                pruner=make_pruner(spec),
                load_if_exists=True,
            )
            self._optuna[study_id] = study
        return study

    def _set_state(self, record: StudyRecord, state: StudyState, error: str | None = None) -> None:
        record.state = state
        if error is not None:
            record.error = error
        if state in STUDY_TERMINAL:
            record.finished_at = time.time()
            # the record first: whoever reads it after the event (the stream's `end`) sees
            # the final record, verdict included
            self._count(record, self.studies.trials(record.id))
            self.studies.save(record)
        data: dict[str, Any] = {"state": state}
        if error:
            data["error"] = error
        self.studies.event(record.id, "state", data)
        log.info("study %s: %s%s", record.id, state, f" ({error})" if error else "")

    @staticmethod
    def _count(record: StudyRecord, trials: dict[int, TrialRecord]) -> None:
        search = [t for t in trials.values() if t.kind is TrialKind.SEARCH]
        record.trials_started = len(search)
        record.trials_done = sum(t.state in TRIAL_FINAL for t in search)
        record.failures = sum(t.state is TrialState.FAILED for t in search)

    # --------------------------------------------------------------------------- following
    def _follow(
        self,
        study: optuna.Study,
        spec: StudyCreate,
        record: StudyRecord,
        trial: TrialRecord,
        cancel: bool,
    ) -> None:
        self._ensure_jobs(spec, record, trial)
        jobs = [self.jobs.get(job_id) for job_id in trial.jobs]
        if any(j is None for j in jobs):
            self._end_trial(study, spec, record, trial, TrialState.FAILED, "a job was deleted")
            return
        records: list[JobRecord] = [j for j in jobs if j is not None]
        if cancel and trial.state is TrialState.RUNNING:
            self._cancel_jobs(records)
        if (
            trial.kind is TrialKind.SEARCH
            and trial.state is TrialState.RUNNING
            and spec.pruner != "none"
            and not cancel
        ):
            self._report(study, spec, record, trial, records[0])
        if not all(j.terminal for j in records):
            if trial.state is TrialState.PRUNING:
                self._cancel_jobs(records)
            self.studies.save_trial(record.id, trial)
            return
        if trial.state is TrialState.PRUNING:
            self._end_trial(study, spec, record, trial, TrialState.PRUNED)
        elif any(j.state is JobState.FAILED for j in records):
            error = next(j.error for j in records if j.state is JobState.FAILED)
            self._end_trial(study, spec, record, trial, TrialState.FAILED, error or "job failed")
        elif any(j.state is JobState.CANCELLED for j in records):
            self._end_trial(study, spec, record, trial, TrialState.CANCELLED, "cancelled")
        else:
            values = [
                objective_value(job_report(self.jobs, j.id, "validation") or {}, spec.objective)
                for j in records
            ]
            if any(v is None for v in values):
                self._end_trial(
                    study, spec, record, trial, TrialState.FAILED, "no validation score"
                )
                return
            trial.values = [float(v) for v in values if v is not None]
            trial.value = statistics.fmean(trial.values)
            trial.spread = statistics.pstdev(trial.values) if len(trial.values) > 1 else None
            self._end_trial(study, spec, record, trial, TrialState.COMPLETE)

    def _report(
        self,
        study: optuna.Study,
        spec: StudyCreate,
        record: StudyRecord,
        trial: TrialRecord,
        job: JobRecord,
    ) -> None:
        """New validation evaluations of the trial's (first) job to the pruner."""
        evals = [
            e
            for e in self.jobs.metric_history(job.id)
            if e.type == "evaluate"
            and e.data.get("split", "validation") == "validation"
            and e.step > trial.last_step
        ]
        if not evals:
            return
        frozen = study.get_trials(deepcopy=False)[trial.number]
        if frozen.state is not OptunaState.RUNNING:
            return
        live = optuna.trial.Trial(study, frozen._trial_id)  # the handle of a running trial
        for event in evals:
            value = objective_value(event.data, spec.objective)
            trial.last_step = event.step
            if value is None or not math.isfinite(value):
                continue
            live.report(value, event.step)
            trial.intermediate = value
            self.studies.event(
                record.id, "trial", {"trial": trial.number, "event": "reported",
                                     "step": event.step, "value": value},
            )  # fmt: skip
        if live.should_prune():
            trial.state = TrialState.PRUNING
            log.info("study %s: pruning trial %d at step %d", record.id, trial.number,
                     trial.last_step)  # fmt: skip

    def _cancel_jobs(self, records: list[JobRecord]) -> None:
        for job in records:
            if not job.terminal:
                self.jobs.cancel(job.id)

    def _end_trial(
        self,
        study: optuna.Study,
        spec: StudyCreate,
        record: StudyRecord,
        trial: TrialRecord,
        state: TrialState,
        error: str | None = None,
    ) -> None:
        trial.state, trial.error, trial.finished_at = state, error, time.time()
        if trial.kind is TrialKind.SEARCH:
            frozen = study.get_trials(deepcopy=False)[trial.number]
            if frozen.state is OptunaState.RUNNING:  # not told yet (a repeat pass skips this)
                if state is TrialState.COMPLETE:
                    study.tell(trial.number, trial.value)
                elif state is TrialState.PRUNED:
                    study.tell(trial.number, state=OptunaState.PRUNED)
                else:
                    study.tell(trial.number, state=OptunaState.FAIL)
        self.studies.save_trial(record.id, trial)
        data: dict[str, Any] = {"trial": trial.number, "event": str(state)}
        if trial.kind is TrialKind.BASELINE:
            data["baseline"] = trial.baseline
        if trial.value is not None:
            data["value"] = trial.value
        if error:
            data["error"] = error
        data["event"] = {"complete": "finished", "pruned": "pruned", "cancelled": "cancelled"}.get(
            state, "failed"
        )
        self.studies.event(record.id, "trial", data)

    def _best(self, spec: StudyCreate, record: StudyRecord, trials: dict[int, TrialRecord]) -> None:
        """The best complete search trial, recomputed from the trials every pass (so a pass
        cut short between a trial's end and the record's save loses nothing); a change is an
        event."""
        done = [
            t
            for t in trials.values()
            if t.kind is TrialKind.SEARCH and t.state is TrialState.COMPLETE and t.value is not None
        ]
        if not done:
            return
        sign = 1.0 if spec.objective.maximize else -1.0
        best = max(done, key=lambda t: (sign * (t.value or 0.0), -t.number))
        if best.number != record.best_trial:
            record.best_trial, record.best_value = best.number, best.value
            record.best_params, record.model_job = best.params, best.jobs[0]
            self.studies.event(
                record.id, "best", {"trial": best.number, "value": best.value,
                                    "params": best.params},
            )  # fmt: skip

    # ---------------------------------------------------------------------------- cancelling
    def _cancel(self, record: StudyRecord, trials: dict[int, TrialRecord]) -> None:
        if record.state is not StudyState.CANCELLING:
            self._set_state(record, StudyState.CANCELLING)
        if all(t.state in TRIAL_FINAL for t in self.studies.trials(record.id).values()):
            self._set_state(record, StudyState.CANCELLED)

    # ------------------------------------------------------------------------------ searching
    def _search(
        self,
        study: optuna.Study,
        spec: StudyCreate,
        record: StudyRecord,
        trials: dict[int, TrialRecord],
    ) -> None:
        budget = spec.budget
        timed_out = (
            budget.timeout_s is not None
            and record.started_at is not None
            and time.time() - record.started_at > budget.timeout_s
        )

        def search() -> list[TrialRecord]:
            return [t for t in trials.values() if t.kind is TrialKind.SEARCH]

        def failures() -> int:
            return sum(t.state is TrialState.FAILED for t in search())

        while (
            not timed_out
            and failures() <= budget.max_failures
            and len(search()) < record.trials_planned
            and sum(t.state not in TRIAL_FINAL for t in search()) < budget.parallel
        ):
            trial = self._launch(study, spec, record, trials)
            trials[trial.number] = trial
        if any(t.state not in TRIAL_FINAL for t in search()):
            return
        over_budget = failures() > budget.max_failures
        if not (over_budget or timed_out or len(search()) >= record.trials_planned):
            return
        complete = [t for t in search() if t.state is TrialState.COMPLETE]
        if over_budget:
            self._set_state(
                record,
                StudyState.FAILED,
                f"the failure budget is spent: {failures()} trials failed "
                f"(max_failures {budget.max_failures})",
            )
        elif not complete:
            self._set_state(record, StudyState.FAILED, "no trial completed")
        else:
            record.importances = importances(study)
            baselines = spec.baselines
            if baselines.single_task or baselines.sum:
                self._set_state(record, StudyState.BASELINES)
            else:
                self._set_state(record, StudyState.SUCCEEDED)

    def _launch(
        self,
        study: optuna.Study,
        spec: StudyCreate,
        record: StudyRecord,
        trials: dict[int, TrialRecord],
    ) -> TrialRecord:
        """Ask Optuna for the next trial (or adopt one asked but never recorded), record it,
        create its jobs."""
        orphan = next(
            (
                t
                for t in study.get_trials(deepcopy=False, states=(OptunaState.RUNNING,))
                if t.number not in trials
            ),
            None,
        )
        if orphan is not None:
            number, params = orphan.number, dict(orphan.params)
        else:
            asked = study.ask({p.path: distribution(p) for p in spec.search_space})
            number, params = asked.number, dict(asked.params)
        trial = TrialRecord(number=number, params=decode(spec, params), started_at=time.time())
        try:
            for variant in spec.selection.variants():
                sampled_config(spec, trial.params, variant)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in err["loc"])
            self._end_trial(
                study, spec, record, trial, TrialState.FAILED,
                f"the sampled config is invalid: {where}: {err['msg']}",
            )  # fmt: skip
            return trial
        self.studies.save_trial(record.id, trial)  # before its jobs: a crash finds the trial
        self._ensure_jobs(spec, record, trial)
        self.studies.event(
            record.id, "trial", {"trial": number, "event": "queued", "params": trial.params,
                                 "jobs": trial.jobs},
        )  # fmt: skip
        return trial

    def _configs(self, spec: StudyCreate, trial: TrialRecord) -> list[TrainConfig]:
        if trial.kind is TrialKind.SEARCH:
            return [sampled_config(spec, trial.params, v) for v in spec.selection.variants()]
        return [baseline_config(spec, trial, v) for v in spec.selection.variants()]

    def _ensure_jobs(self, spec: StudyCreate, record: StudyRecord, trial: TrialRecord) -> None:
        """Create the trial's jobs that do not exist yet (idempotent: one key per run)."""
        if len(trial.jobs) == len(spec.selection.variants()):  # the usual pass: nothing to do
            return
        configs = self._configs(spec, trial)
        label = record.name or record.id
        jobs = []
        for k, config in enumerate(configs):
            name = (
                f"{label}: trial {trial.number}"
                if trial.kind is TrialKind.SEARCH
                else (f"{label}: baseline {trial.baseline}")
            )
            created = self.jobs.create(
                NewJob(
                    owner=record.owner,
                    name=name + (f" (run {k + 1} of {len(configs)})" if len(configs) > 1 else ""),
                    config_json=config.model_dump_json(),
                    max_attempts=self.settings.max_restarts + 1,
                    idempotency_key=self.jobs.keys.study_job(record.id, f"{trial.number}:{k}"),
                    idempotency_ttl_s=STUDY_JOB_TTL_S,
                    fields={"study_id": record.id, "trial": trial.number},
                    **routing(self.settings, config.devices),
                )
            )
            assert created.job_id is not None
            new = created.record if created.outcome is CreateOutcome.CREATED else None
            if new is not None and not new.held:  # held: the reaper sends it when there is room
                self.publish(created.job_id, 1, new.queue)
                self.jobs.mark_published(created.job_id, 1)
            jobs.append(created.job_id)
        trial.jobs = jobs
        self.studies.save_trial(record.id, trial)

    # ------------------------------------------------------------------------------ baselines
    @staticmethod
    def _same_as_best(spec: StudyCreate, best: TrialRecord, name: str) -> bool:
        """The `sum` baseline is the best trial itself when that already used plain `sum` and
        no gradient strategy: same config, same seeds, so its jobs stand for it."""
        if name != "sum" or best.state is not TrialState.COMPLETE:
            return False
        probe = TrialRecord(number=-1, kind=TrialKind.BASELINE, baseline=name,
                            params=best.params, started_at=0.0)  # fmt: skip
        return all(
            sampled_config(spec, best.params, v) == baseline_config(spec, probe, v)
            for v in spec.selection.variants()
        )

    def _baselines(
        self, spec: StudyCreate, record: StudyRecord, trials: dict[int, TrialRecord]
    ) -> None:
        wanted: list[str] = []
        base = sampled_config(spec, record.best_params or {})
        if spec.baselines.single_task and len(base.tasks) > 1:
            wanted += [f"single:{t}" for t in base.task_names]
        if spec.baselines.sum:
            wanted.append("sum")
        existing = {t.baseline: t for t in trials.values() if t.kind is TrialKind.BASELINE}
        best = trials.get(record.best_trial) if record.best_trial is not None else None
        for i, name in enumerate(wanted):
            if name not in existing and best is not None and self._same_as_best(spec, best, name):
                trial = TrialRecord(
                    number=BASELINE_FIRST + i, kind=TrialKind.BASELINE, baseline=name,
                    params=dict(best.params), state=best.state, jobs=list(best.jobs),
                    value=best.value, values=list(best.values), spread=best.spread,
                    started_at=time.time(), finished_at=time.time(), same_as=best.number,
                )  # fmt: skip
                self.studies.save_trial(record.id, trial)
                self.studies.event(
                    record.id, "trial", {"trial": trial.number, "event": "finished",
                                         "baseline": name, "jobs": trial.jobs,
                                         "same_as": best.number, "value": trial.value},
                )  # fmt: skip
                existing[name] = trial
            elif name not in existing:
                trial = TrialRecord(
                    number=BASELINE_FIRST + i,
                    kind=TrialKind.BASELINE,
                    baseline=name,
                    params=dict(record.best_params or {}),
                    started_at=time.time(),
                )
                self.studies.save_trial(record.id, trial)
                self._ensure_jobs(spec, record, trial)
                self.studies.event(
                    record.id, "trial", {"trial": trial.number, "event": "queued",
                                         "baseline": name, "jobs": trial.jobs},
                )  # fmt: skip
                existing[name] = trial
        if not all(t.state in TRIAL_FINAL for t in existing.values()):
            return
        everything = trials | {t.number: t for t in existing.values()}
        record.verdict = verdict(self.jobs, spec, record, everything)
        self._set_state(record, StudyState.SUCCEEDED)
