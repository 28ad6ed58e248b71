"""Every Redis key the service uses, in one place.

All keys share one prefix (`MTL_KEY_PREFIX`, default ``mtl``) so that one Redis can hold
several deployments (and each test session its own namespace). Braces are not used: the
service expects a single Redis, not a cluster.

Per job ``{p}:job:{id}``::

    {p}:job:{id}            hash    the job record: the source of truth (state, attempt, owner, ...)
    {p}:job:{id}:config     string  the TrainConfig as JSON
    {p}:job:{id}:events     stream  progress events (capped, expires after the job ends)
    {p}:job:{id}:metrics    zset    metric history, score = step (trimmed on resume)
    {p}:job:{id}:lease      string  "<attempt>:<token>" with a TTL while an attempt runs

Indexes::

    {p}:jobs:queued         zset    queued job ids, score = priority band * 1e13 + enqueue
                                    sequence (the queue position: high before normal before low)
    {p}:jobs:held           zset    queued jobs not sent to the workers yet: their key is at its
                                    device limit (`max_devices_per_key`); same score
    {p}:jobs:active         set     running and cancelling job ids (what the reaper scans)
    {p}:queue:seq           string  counter for the queue order
    {p}:owner:{o}:jobs      zset    the owner's job ids, score = creation time (ms)
    {p}:owner:{o}:jobs:{s}  zset    the same, for one state
    {p}:idem:{o}:{key}      string  Idempotency-Key -> job id (with a TTL)
    {p}:dataset:{id}        hash    an uploaded dataset's record
    {p}:owner:{o}:datasets  zset    the owner's dataset ids, score = upload time (ms)
    {p}:ensemble:{id}       hash    an ensemble: `owner`, `record` (EnsembleRecord JSON)
    {p}:owner:{o}:ensembles zset    the owner's ensemble ids, score = creation time (ms)
    {p}:workers             zset    worker heartbeats, member = worker name, score = time (ms)
    {p}:workers:devices     hash    worker name -> the devices it declared
    {p}:study:{id}          hash    a study: `owner`, `record` (StudyRecord JSON), `cancel`
    {p}:study:{id}:trials   hash    trial number -> TrialRecord JSON
    {p}:study:{id}:events   stream  the study's events (like a job's)
    {p}:study:{id}:lock     string  the token of the worker driving the study (with a TTL)
    {p}:study:{id}:optuna   prefix  Optuna's journal (`...:log_number`, `...:log:{n}`)
    {p}:studies:active      set     studies not finished yet (what the drivers scan)
    {p}:owner:{o}:studies   zset    the owner's study ids, score = creation time (ms)
    {p}:studyjob:{id}:{key} string  idempotency of a trial's job (study id, trial, seed)
    {p}:proc:{host}:{pid}   string  "<job id> <attempt> <token>": the attempt a training process
                                    runs (set after `begin`, removed when it ends, at the
                                    start of a process reusing the pid, or by the parent)

Celery's (kombu's) own keys, under ``{p}:celery:``::

    {p}:celery:{queue}      list    messages waiting for a worker
    {p}:celery:unacked      hash    messages a worker took and has not acknowledged yet
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    prefix: str = "mtl"

    # ----------------------------------------------------------------------------- per job
    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def config(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:config"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def metrics(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:metrics"

    def lease(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:lease"

    def job_keys(self, job_id: str) -> list[str]:
        """Every per-job key (for DELETE)."""
        return [
            self.job(job_id),
            self.config(job_id),
            self.events(job_id),
            self.metrics(job_id),
            self.lease(job_id),
        ]

    # ----------------------------------------------------------------------------- indexes
    @property
    def queued(self) -> str:
        return f"{self.prefix}:jobs:queued"

    @property
    def held(self) -> str:
        return f"{self.prefix}:jobs:held"

    @property
    def active(self) -> str:
        return f"{self.prefix}:jobs:active"

    @property
    def queue_seq(self) -> str:
        return f"{self.prefix}:queue:seq"

    def owner_jobs(self, owner: str, state: str | None = None) -> str:
        base = f"{self.prefix}:owner:{owner}:jobs"
        return base if state is None else f"{base}:{state}"

    def owner_jobs_pattern(self, state: str) -> str:
        """SCAN pattern of every owner's index of jobs in `state` (for /metrics)."""
        return f"{self.prefix}:owner:*:jobs:{state}"

    def owner_jobs_prefix(self, owner: str) -> str:
        """`owner_jobs(owner, state)` is this plus the state (used inside Lua)."""
        return f"{self.prefix}:owner:{owner}:jobs:"

    def idempotency(self, owner: str, key: str) -> str:
        return f"{self.prefix}:idem:{owner}:{key}"

    # ----------------------------------------------------------------------------- datasets
    def dataset(self, dataset_id: str) -> str:
        return f"{self.prefix}:dataset:{dataset_id}"

    def owner_datasets(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:datasets"

    # ----------------------------------------------------------------------------- ensembles
    def ensemble(self, ensemble_id: str) -> str:
        return f"{self.prefix}:ensemble:{ensemble_id}"

    def owner_ensembles(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:ensembles"

    # ----------------------------------------------------------------------------- studies
    def study(self, study_id: str) -> str:
        return f"{self.prefix}:study:{study_id}"

    def study_trials(self, study_id: str) -> str:
        return f"{self.prefix}:study:{study_id}:trials"

    def study_events(self, study_id: str) -> str:
        return f"{self.prefix}:study:{study_id}:events"

    def study_lock(self, study_id: str) -> str:
        return f"{self.prefix}:study:{study_id}:lock"

    def study_optuna(self, study_id: str) -> str:
        """The prefix of the study's Optuna journal keys."""
        return f"{self.prefix}:study:{study_id}:optuna"

    @property
    def studies_active(self) -> str:
        return f"{self.prefix}:studies:active"

    def owner_studies(self, owner: str) -> str:
        return f"{self.prefix}:owner:{owner}:studies"

    def study_job(self, study_id: str, key: str) -> str:
        """The idempotency key of one of a study's jobs (`key`: trial and seed)."""
        return f"{self.prefix}:studyjob:{study_id}:{key}"

    # ----------------------------------------------------------------------------- workers
    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def worker_devices(self) -> str:
        return f"{self.prefix}:workers:devices"

    def process(self, host: str, pid: int) -> str:
        return f"{self.prefix}:proc:{host}:{pid}"

    # ------------------------------------------------------------------- broker (kombu)
    @property
    def broker_prefix(self) -> str:
        """kombu's `global_keyprefix`: every key the Celery transport writes starts so."""
        return f"{self.prefix}:celery:"

    def broker_queue(self, queue: str) -> str:
        return f"{self.broker_prefix}{queue}"

    @property
    def broker_unacked(self) -> str:
        return f"{self.broker_prefix}unacked"
