"""Several test hosts on one machine: a Linux network namespace per host (`ip netns`), each with
a veth pair onto a bridge in the test's own namespace, its own address, and its own hostname
(`unshare --uts`). Processes on a host see only its network: loopback is its own, the other
hosts are reached by address over the bridge, as over a LAN. Needs root (or CAP_NET_ADMIN);
`netns_unavailable()` says why not where it is not allowed.

    with Lab(["store", "api", "a", "b"]) as lab:
        lab["api"].popen([...], env=..., log=path)   # runs inside the `api` host
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "-n", netns, *args]
    subprocess.run(command, check=True, capture_output=True, timeout=20)


def netns_unavailable() -> str | None:
    """None when namespaces, veth pairs and bridges can be made here; else the reason."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    if shutil.which("unshare") is None:
        return "util-linux `unshare` is not installed"
    name = f"mtlprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
        try:
            _ip("link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
            _ip("link", "del", f"{name}a")
        finally:
            _ip("netns", "del", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        stderr = getattr(exc, "stderr", b"") or b""
        return f"network namespaces are not allowed here: {stderr.decode().strip() or exc}"
    return None


@dataclass
class Host:
    name: str
    netns: str
    ip: str

    def command(self, argv: Iterable[str]) -> list[str]:
        """`argv` run on this host: in its namespace, under its own hostname."""
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--uts", "sh", "-c", f'hostname {self.name} && exec "$@"', "sh", *argv,
        ]  # fmt: skip

    def popen(
        self, argv: Iterable[str], *, env: Mapping[str, str], log: Path, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a process on this host (a process group of its own; its output to `log`)."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.command(argv),
                env=dict(env),
                cwd=str(cwd) if cwd else None,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def kill_tree(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process group started by `Host.popen` and reap its leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class Lab:
    """Hosts on a private bridge, 10.<x>.<y>.0/24 (the test's namespace is .1)."""

    def __init__(self, names: list[str]) -> None:
        tag = secrets.token_hex(2)
        self.bridge = f"mtlbr{tag}"
        octet = int(tag, 16) % 200 + 20
        self.subnet = f"10.{octet}.{int(tag[:2], 16) % 250}"
        self.gateway = f"{self.subnet}.1"
        self.hosts = {
            name: Host(name=name, netns=f"mtl{tag}{name}", ip=f"{self.subnet}.{i + 2}")
            for i, name in enumerate(names)
        }
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> Lab:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            self._made.append(f"link:{self.bridge}")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, host in enumerate(self.hosts.values()):
                _ip("netns", "add", host.netns)
                self._made.append(f"netns:{host.netns}")
                outside, inside = f"{self.bridge}v{i}", f"{self.bridge}p{i}"
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                self._made.append(f"link:{outside}")
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("link", "set", inside, "netns", host.netns)
                _ip("addr", "add", f"{host.ip}/24", "dev", inside, netns=host.netns)
                _ip("link", "set", inside, "up", netns=host.netns)
                _ip("link", "set", "lo", "up", netns=host.netns)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for item in reversed(self._made):
            kind, name = item.split(":", 1)
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                if kind == "netns":
                    # processes still inside keep it alive: the caller kills them first
                    _ip("netns", "del", name)
                else:
                    _ip("link", "del", name)
        self._made.clear()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
