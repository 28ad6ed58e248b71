"""Memory of the API process while it takes a large upload (`POST /v1/datasets`).

    python benchmarks/upload_memory.py [--sizes 16 100] [--shapes short tiny] [--root DIR]
                                       [--json FILE]

For each size (MiB) and row shape it writes a CSV of unique rows, ``short``: ``short review
number <i>,<label>`` (about 33 bytes: 16 MiB is half a million rows, 100 MiB 3.2 million) or
``tiny``: ``t<i>,<label>`` (about 14 bytes: 100 MiB is 7.4 million rows; the more rows per
byte, the more a reader that keeps every record holds), starts its own
redis-server and a fresh API (uvicorn, one process, the default 100 MiB upload cap) on
127.0.0.1, uploads one small file to warm up, resets the process's peak RSS (VmHWM, via
/proc/<pid>/clear_refs) and uploads the file while a second client polls /healthz every 100 ms.
Reported per size: rows, upload time, the API's RSS before, its peak RSS growth (VmHWM minus
the RSS before), its RSS growth after, and the slowest /healthz. The API must answer 201 with
every row counted.

`--root` runs the API from another tree (e.g. an older commit unpacked with `git archive`), to
compare before and after a change on the same machine. docs/performance.md has the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.embedded import RedisServer, free_port, stop_process  # noqa: E402

KEY = "bench-upload-key-0001"
LABELS = ("pos", "neg", "neutral")
SHAPES = {"short": "short review number {i},{label}\n", "tiny": "t{i},{label}\n"}


def write_csv(path: Path, size: int, shape: str) -> int:
    """A CSV of at most `size` bytes of unique rows; returns the number of data rows."""
    row = SHAPES[shape]
    rows = 0
    written = 0
    with open(path, "w") as f:
        written += f.write("text,label\n")
        while True:
            line = row.format(i=rows, label=LABELS[rows % 3])
            if written + len(line) > size:
                return rows
            written += f.write(line)
            rows += 1


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def start_api(root: Path, redis_url: str, data_dir: Path, log: Path) -> tuple[Any, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTL_")}
    env.update(
        MTL_REDIS_URL=redis_url,
        MTL_DATA_DIR=str(data_dir),
        MTL_KEY_PREFIX="benchupload",
        MTL_API_KEYS=json.dumps({"bench": KEY}),
        PYTHONPATH=str(root),
    )
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, cwd=str(root), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(log.read_text())
        time.sleep(0.2)


def measure(root: Path, redis_url: str, workdir: Path, size_mib: int, shape: str) -> dict[str, Any]:
    path = workdir / f"upload-{size_mib}-{shape}.csv"
    rows = write_csv(path, size_mib * 2**20, shape)
    size = path.stat().st_size
    proc, url = start_api(root, redis_url, workdir / f"data-{path.stem}", workdir / "api.log")
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=600) as api:
            warm = api.post("/v1/datasets", files={"file": ("warm.csv", b"text,label\nx,a\n")})
            assert warm.status_code == 201, warm.text
            time.sleep(0.5)
            reset = True
            try:
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            except OSError:
                reset = False  # VmHWM then includes the start-up peak: an upper bound
            before, _ = memory(proc.pid)
            slowest = 0.0
            done = threading.Event()

            def poll() -> None:
                nonlocal slowest
                with httpx.Client(base_url=url, timeout=60) as probe:
                    while not done.is_set():
                        t0 = time.monotonic()
                        probe.get("/healthz")
                        slowest = max(slowest, time.monotonic() - t0)
                        done.wait(0.1)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            t0 = time.monotonic()
            try:
                with open(path, "rb") as f:
                    r = api.post("/v1/datasets", files={"file": (path.name, f)})
            finally:
                done.set()
                poller.join(timeout=60)
            took = time.monotonic() - t0
            after, peak = memory(proc.pid)
            if r.status_code != 201 or r.json()["rows"] != rows:
                raise RuntimeError(f"upload of {size_mib} MiB: {r.status_code} {r.text[:300]}")
            api.delete(f"/v1/datasets/{r.json()['id']}")
    finally:
        stop_process(proc, timeout=10)
        path.unlink()
    return {
        "size_mib": size_mib,
        "shape": shape,
        "bytes": size,
        "rows": rows,
        "upload_s": round(took, 2),
        "rss_before_mib": round(before / 2**20, 1),
        "peak_growth_mib": round((peak - before) / 2**20, 1),
        "rss_after_growth_mib": round((after - before) / 2**20, 1),
        "slowest_healthz_ms": round(slowest * 1000, 1),
        "peak_reset": reset,
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 100], help="MiB")
    parser.add_argument("--shapes", nargs="+", default=["short", "tiny"], choices=list(SHAPES))
    parser.add_argument("--root", type=Path, default=ROOT, help="the tree the API runs from")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    print(
        f"CPU: {cpu_model()} ({os.cpu_count()} cores), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; API from {args.root}"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="upload-memory-") as tmp:
        workdir = Path(tmp)
        with RedisServer(workdir / "redis", appendonly=False) as redis_server:
            for shape in args.shapes:
                for size in args.sizes:
                    result = measure(args.root, redis_server.url, workdir, size, shape)
                    results.append(result)
                    print(
                        f"{size:4d} MiB, {shape:5s} rows ({result['rows']:>9,}): upload "
                        f"{result['upload_s']:6.2f} s;"
                        f" API RSS {result['rss_before_mib']:6.1f} MiB before, peak "
                        f"+{result['peak_growth_mib']:.1f} MiB, after "
                        f"+{result['rss_after_growth_mib']:.1f} MiB; slowest /healthz "
                        f"{result['slowest_healthz_ms']:.0f} ms"
                        + ("" if result["peak_reset"] else " (VmHWM not reset: upper bound)"),
                        flush=True,
                    )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
