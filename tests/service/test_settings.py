"""Settings, the Celery configuration and import boundaries."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.embedded import REPO_ROOT
from service.queue import make_celery
from service.settings import Settings


def test_celery_is_json_only_early_ack_one_job_per_child() -> None:
    conf = make_celery(Settings(redis_url="redis://127.0.0.1:1/0")).conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late is False
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 1
    assert conf.worker_concurrency == 1
    assert conf.task_always_eager is False


def test_api_keys_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTL_API_KEYS", '{"alice": "long-enough-key"}')
    assert Settings().api_keys == {"alice": "long-enough-key"}
    with pytest.raises(ValidationError, match="shorter than 8"):
        Settings(api_keys={"alice": "short"})
    with pytest.raises(ValidationError, match="owner name"):
        Settings(api_keys={"a:b": "long-enough-key"})
    with pytest.raises(ValidationError, match="share one key"):
        Settings(api_keys={"a": "long-enough-key", "b": "long-enough-key"})
    monkeypatch.setenv("MTL_API_KEYS", "")
    assert Settings().open_access


def test_the_api_process_does_not_import_torch() -> None:
    code = (
        "import sys, app.main, app.api.routes.jobs, service.store, service.queue; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_blocking_reads_stay_within_the_socket_timeout(tmp_path: object) -> None:
    """redis-py times out reads after `socket_timeout` (5 s by default): the event hub's
    blocking XREAD must return before that, whatever the SSE keep-alive period."""
    import asyncio

    from app.main import create_app

    settings = Settings(redis_url="redis://127.0.0.1:1/0", sse_keepalive_s=60, data_dir=tmp_path)
    app = create_app(settings)

    async def check() -> None:
        async with app.router.lifespan_context(app):
            socket_timeout = app.state.redis.connection_pool.connection_kwargs["socket_timeout"]
            assert app.state.hubs.block_ms / 1000 <= socket_timeout / 2

    asyncio.run(check())
