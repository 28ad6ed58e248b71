"""`app.serve.serve` (what `mtl serve` runs): embedded Redis, one worker, the API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.embedded import REPO_ROOT, free_port, stop_process
from tests.service.conftest import read_sse


def test_serve_runs_the_swagger_example(tmp_path: Path) -> None:
    port = free_port()
    redis_port = free_port()
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTL_")}
    env.update(MTL_TORCH_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    code = (
        "from app.serve import serve; "
        f"serve(port={port}, data_dir={str(data_dir)!r}, redis_port={redis_port}, "
        "log_level='warning')"
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=str(REPO_ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert "open access" in log.read_text()  # no keys: a warning at start-up

        with httpx.Client(base_url=url, timeout=30) as client:
            spec = client.get("/openapi.json").json()
            content = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
            example = content["application/json"]["examples"]["two_task_dummy"]["value"]
            r = client.post("/v1/jobs", json=example)  # exactly what "Try it out" sends
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            events, _ = read_sse(client, job_id)
            job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "succeeded", job
        first_log = next(e for e in events if e.get("event") == "log")
        assert first_log["received"] < job["finished_at"]  # streamed live, not replayed after
        assert events[-1]["event"] == "end"
        assert (data_dir / "jobs" / job_id / "model" / "mtl.json").is_file()
        assert any((data_dir / "redis").glob("appendonly*"))  # persistence in the data dir
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(proc, sig=signal.SIGKILL)
                raise
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    # everything it started is gone: Redis no longer answers
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", redis_port)) != 0
