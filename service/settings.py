"""Service settings: one pydantic-settings class, read from the environment (prefix ``MTL_``).

The API and the worker read the same environment, so one class describes it, in sections:
where things live (both), access, limits and browsers (the API), the job protocol (both: the
API writes a job's restart budget and stream limits, the worker keeps its lease, the reaper
and the stall watchdog), and the models a job may name (the API checks them on submit).
It loads only pydantic-settings: no web, queue or training code.

Examples::

    MTL_REDIS_URL=redis://:secret@redis:6379/0
    MTL_DATA_DIR=/data
    MTL_API_KEYS='{"alice": "key-a", "bob": "key-b"}'    # owner name -> bearer key
"""

from __future__ import annotations

import contextlib
import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mtl.config import BUNDLED_MINILM

__all__ = ["Settings", "get_settings"]

OWNER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
ANONYMOUS = "anonymous"
# an explicit browser origin: scheme://host[:port], no wildcard, no path
ORIGIN_PATTERN = re.compile(
    r"^https?://([A-Za-z0-9][A-Za-z0-9.\-]*|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MTL_", extra="ignore", env_ignore_empty=True)

    # --- where things live
    redis_url: str | None = Field(
        default=None, description="redis://[:password@]host:port/db; None: `mtl serve` starts one"
    )
    data_dir: Path = Field(
        default=Path(".mtl"), description="datasets, checkpoints, exported models"
    )
    storage_url: str | None = Field(
        default=None,
        description="where datasets, checkpoints, models and TensorBoard files live: unset: the "
        "data directory itself (API and workers share it); `s3://bucket/prefix` (with the "
        "MTL_S3_* settings) or another fsspec URL: a store API and workers reach over the "
        "network, with nothing shared on disk (see service/storage.py)",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="an S3-compatible server (MinIO, SeaweedFS...); unset: AWS"
    )
    s3_region: str | None = Field(default=None)
    s3_access_key_id: SecretStr | None = Field(default=None)
    s3_secret_access_key: SecretStr | None = Field(default=None)
    cache_dir: Path | None = Field(
        default=None,
        description="local copies of stored units (models, datasets, checkpoints to resume) and "
        "the work folders of running jobs, with a remote store; default <data_dir>/cache",
    )
    cache_max_bytes: int = Field(
        default=20 * 1024**3, ge=0, description="the cache's size; least recently used evicted"
    )
    key_prefix: str = Field(default="mtl", pattern=r"^[A-Za-z0-9_\-.]{1,32}$")
    redis_max_connections: int = Field(default=256, ge=8, description="per API process")
    redis_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="the API's Redis connect/read timeout: a stalled Redis gets a 503 after "
        "this, not a hung request (timed-out commands are not retried)",
    )

    share_with_group: bool = Field(
        default=False,
        description="files the service writes readable by its group (0640 / 0750) instead of "
        "its user alone (0600 / 0700)",
    )

    # --- access
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="owner name -> bearer key; empty: open access (local use only)",
    )

    # --- limits
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1, description="dataset upload cap")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, description="JSON request bodies")
    max_dataset_columns: int = Field(
        default=1000, ge=2, description="columns (CSV) or keys per row (JSONL) of an upload"
    )
    max_field_chars: int = Field(
        default=100_000, ge=1, description="characters in one value of an uploaded dataset"
    )
    max_job_params: int = Field(
        default=2_000_000_000,
        ge=1,
        description="parameters of one job's model (encoder and heads), estimated on submit",
    )
    max_job_memory_gib: float = Field(
        default=80.0,
        gt=0,
        description="training memory of one job, estimated on submit (mtl/budget.py: weights, "
        "gradients, optimizer state, activations at the batch size and max length, dummy "
        "data); 80 fits one 80 GB GPU; for CPU workers set their RAM (e.g. 16)",
    )
    max_predict_texts: int = Field(default=256, ge=1)
    max_text_chars: int = Field(default=20_000, ge=1)
    page_size_max: int = Field(default=100, ge=1)
    predictor_cache_size: int = Field(default=2, ge=1, description="loaded models kept in the API")
    predict_threads: int = Field(default=2, ge=1, description="concurrent predict calls")
    predict_batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        le=1000,
        description="how long a predict call on an idle model waits for others on the same "
        "model to run with it as one batch (not after a batch of one call); 0: no wait (calls "
        "that queue while the model is busy still run together)",
    )
    predict_max_batch: int = Field(
        default=64,
        ge=1,
        le=4096,
        description="texts per batched model run (a call with more runs alone); 1: no batching",
    )
    max_active_jobs_per_key: int = Field(
        default=20,
        ge=0,
        description="queued, running and cancelling jobs one API key may have at once "
        "(a submit over it is a 429); 0: no limit",
    )
    max_devices_per_key: int = Field(
        default=0,
        ge=0,
        description="devices one API key's jobs may hold at once (running, cancelling, or "
        "queued and released to the workers); a job over it waits, queued, with the reason in "
        "its `queued_reason`, until the key's other jobs end; 0: no limit",
    )
    retry_after_s: int = Field(
        default=30, ge=1, le=3600, description="the Retry-After of a 429 (per-key job limit)"
    )

    # --- browsers
    cors_origins: list[str] = Field(
        default_factory=list,
        description='origins allowed to call the API from a browser, e.g. ["https://ui.example"]; '
        "empty: no CORS headers at all (same-origin only)",
    )

    # --- job protocol
    max_restarts: int = Field(default=3, ge=0, le=100, description="re-queues after a lost worker")
    lease_ttl_s: float = Field(default=30.0, gt=0.5, description="a running attempt's lease")
    cancel_poll_s: float = Field(
        default=0.25,
        gt=0,
        description="how often a run renews its lease, writes progress and reads "
        "its cancel flag (a background thread; the training step only reads a bool)",
    )
    stall_timeout_s: float = Field(
        default=3600.0,
        ge=0,
        description="a training process that reports no progress (no step end, log, "
        "evaluation or save) for this long is presumed hung (stuck I/O, a deadlock): it gives "
        "up its lease and exits, and the job is re-queued as after a lost worker; 0: never",
    )
    reaper_interval_s: float = Field(default=5.0, gt=0)
    republish_after_s: float = Field(
        default=30.0,
        ge=1,
        description="a queued attempt whose message was never confirmed sent, or has been "
        "missing from the broker (taken by a worker that died before starting it) for this "
        "long, is published again (at least the lease)",
    )
    study_poll_s: float = Field(
        default=0.25,
        gt=0,
        le=10,
        description="how often a worker's study driver looks at the active studies (the delay "
        "between a trial's end and the next trial's launch)",
    )
    heartbeat_s: float = Field(default=5.0, gt=0, description="worker heartbeat period")
    stream_maxlen: int = Field(
        default=10_000, ge=100, description="events kept per job (approximate)"
    )
    stream_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=1, description="event stream expiry after the job ends"
    )
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1)
    sse_keepalive_s: float = Field(
        default=10.0, gt=0, description="below FastAPI's own 15 s ping, which then never fires"
    )
    queue_name: str = Field(
        default="mtl-train",
        pattern=r"^[A-Za-z0-9_\-]{1,64}$",
        description="the base name of the job queues (see service/queue.py: one per priority "
        "and device count)",
    )
    worker_devices: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="the devices this worker has: it takes jobs that need at most this many "
        "(`devices` of the config); unset: the GPUs it sees (/dev/nvidiaN, limited by "
        "CUDA_VISIBLE_DEVICES), or 1 on a machine without one (a CPU worker that should run "
        "several gloo processes per job sets it)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="intra-op threads of a training run"
    )
    preload_torch: bool = Field(
        default=True,
        description="import torch in the worker's main process so each fresh child "
        "process starts fast (CUDA is not initialised there)",
    )

    # --- models a job may name (besides random_init encoders)
    allowed_models: list[str] = Field(
        default_factory=lambda: [BUNDLED_MINILM],
        description="hub model ids a job may name (the default resolves to the bundled MiniLM)",
    )
    model_roots: list[Path] = Field(
        default_factory=list,
        description="local directories under which a job may name a model directory; "
        "empty: no local paths",
    )

    @model_validator(mode="after")
    def _poll_within_lease(self) -> Settings:
        if self.cancel_poll_s * 2 > self.lease_ttl_s:
            raise ValueError("cancel_poll_s must be at most half of lease_ttl_s")
        return self

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.rstrip("/")
        scheme, sep, rest = value.partition("://")
        if not sep or not scheme or not rest.strip("/"):
            raise ValueError(
                f"storage_url {value!r} must be a URL with a scheme and a root, "
                "e.g. s3://bucket/prefix or file:///srv/mtl"
            )
        return value

    @field_validator("api_keys")
    @classmethod
    def _owners(cls, value: dict[str, str]) -> dict[str, str]:
        for owner, key in value.items():
            if not OWNER_PATTERN.match(owner):
                raise ValueError(f"owner name {owner!r} must match {OWNER_PATTERN.pattern}")
            if len(key) < 8:
                raise ValueError(f"the key of {owner!r} is shorter than 8 characters")
        if len(set(value.values())) != len(value):
            raise ValueError("two owners share one key")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if not ORIGIN_PATTERN.match(origin):
                raise ValueError(
                    f"CORS origin {origin!r} must be an explicit scheme://host[:port] "
                    "(no wildcard, no path)"
                )
        return value

    def private_files(self) -> None:
        """Files this process creates are its user's alone (0600, folders 0700; with
        `share_with_group`, readable by the group: 0640 / 0750), and the data directory exists
        with that mode. Called at the start of the API, the worker and `mtl serve`."""
        os.umask(0o027 if self.share_with_group else 0o077)
        mode = 0o750 if self.share_with_group else 0o700
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=mode)
        with contextlib.suppress(PermissionError):  # a volume owned by someone else
            self.data_dir.chmod(mode)

    @property
    def open_access(self) -> bool:
        return not self.api_keys

    def local_devices(self) -> int:
        """The devices this worker declares (`worker_devices`, else the GPUs it sees). No
        CUDA is touched: the device files are counted."""
        if self.worker_devices is not None:
            return self.worker_devices
        found = sum(1 for p in Path("/dev").glob("nvidia*") if p.name[6:].isdigit())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            named = [v for v in visible.split(",") if v.strip() and v.strip() != "-1"]
            found = min(found, len(named))
        return max(1, found)

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("MTL_REDIS_URL is not set (`mtl serve` sets it up for local use)")
        return self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
