"""Workers on other hosts, with no shared disk: the API and the workers share only Redis and an
S3 bucket (SeaweedFS, a real S3-compatible server).

* On loopback (always): a job on a CSV dataset uploaded through the API trains on a worker with
  its own data directory; its model, downloaded through the API, is byte-identical to the
  archive in the bucket; predict and TensorBoard work from the bucket; an ensemble of two such
  jobs is built from their staged models; deleting a job removes its objects.
* On separate hosts (network namespaces: a store host with Redis and the S3 server, an API host,
  worker hosts A and B, each with its own data directory and hostname): a job runs on A; A's
  processes are killed mid-run; the job resumes on B from the checkpoint in the bucket and
  finishes; the model downloaded through the API is byte-identical to the one in the bucket.
  Skips, with the reason, where network namespaces are not allowed.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.embedded import REPO_ROOT, free_port, redis_executable, stop_process, worker_command
from service.keys import Keys
from tests.hosts import Host, Lab, kill_tree, netns_unavailable
from tests.s3server import SeaweedS3
from tests.service.conftest import DUMMY, KEYS, auth, long_config

pytestmark = pytest.mark.slow

PREFIX = "mtlhosts"
QUEUE = "mtl-hosts"
BUCKET = "mtl"


def _env(redis_url: str, data_dir: Path, s3: SeaweedS3) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MTL_REDIS_URL": redis_url,
        "MTL_DATA_DIR": str(data_dir),
        "MTL_KEY_PREFIX": PREFIX,
        "MTL_QUEUE_NAME": QUEUE,
        "MTL_API_KEYS": json.dumps(KEYS),
        "MTL_LEASE_TTL_S": "3",
        "MTL_CANCEL_POLL_S": "0.2",
        "MTL_REAPER_INTERVAL_S": "0.5",
        "MTL_HEARTBEAT_S": "0.5",
        "MTL_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **s3.env(f"s3://{BUCKET}/mtl"),
    }


def _wait_http(url: str, process: Any, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer: {log.read_text()[-3000:]}")


def _wait_worker(client: redis.Redis, process: Any, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited: {log.read_text()[-3000:]}")
        members = client.zrangebyscore(Keys(PREFIX).workers, (time.time() - 3) * 1000, "+inf")
        if any(f":{process.pid}" in m or str(process.pid) in m for m in members):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the worker sent no heartbeat: {log.read_text()[-3000:]}")


def _wait_state(api: httpx.Client, job_id: str, states: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job still {job['state']}: {job}"
        time.sleep(0.2)


def _bucket_bytes(s3: SeaweedS3, key: str) -> bytes:
    return s3.filesystem().cat_file(f"{BUCKET}/mtl/{key}")  # type: ignore[no-any-return]


def _bucket_keys(s3: SeaweedS3, prefix: str) -> list[str]:
    fs = s3.filesystem()
    try:
        found = fs.find(f"{BUCKET}/mtl/{prefix}", detail=True)
    except FileNotFoundError:
        return []
    # objects only (SeaweedFS may keep an emptied folder's entry for a while)
    return sorted(
        str(p).removeprefix(f"{BUCKET}/mtl/") for p, info in found.items() if info["type"] == "file"
    )


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ loopback


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis, SeaweedFS, an API and one worker on loopback; API and worker with their own
    data directories."""
    from service.embedded import RedisServer

    root = tmp_path_factory.mktemp("remote-store")
    with (
        RedisServer(root / "redis", password="hosts-redis") as server,
        SeaweedS3(root / "s3").start() as s3,
    ):
        s3.make_bucket(BUCKET)
        api_env = _env(server.url, root / "api-data", s3)
        worker_env = _env(server.url, root / "worker-data", s3)
        port = free_port()
        api_log = root / "api.log"
        with open(api_log, "ab") as log:
            api = subprocess_popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                api_env, log,
            )  # fmt: skip
        worker_log = root / "worker.log"
        with open(worker_log, "ab") as log:
            worker = subprocess_popen(worker_command(name="remote@%h"), worker_env, log)
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_http(url, api, api_log)
            _wait_worker(client, worker, worker_log)
            yield {
                "url": url, "s3": s3, "redis": client, "root": root,
                "worker_log": worker_log,
            }  # fmt: skip
        finally:
            client.close()
            stop_process(worker, timeout=10)
            stop_process(api, timeout=10)


def subprocess_popen(argv: list[str], env: dict[str, str], log: Any) -> Any:
    import subprocess

    return subprocess.Popen(
        argv, env=env, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


CSV = "text,task_a,task_b\n" + "".join(
    f"{'good great fine' if i % 2 else 'bad awful poor'} text number {i},"
    f"{'pos' if i % 2 else 'neg'},{['x', 'y', 'z'][i % 3]}\n"
    for i in range(80)
)


def _files_job(dataset: str, seed: int) -> dict[str, Any]:
    cfg = json.loads(json.dumps(DUMMY))
    cfg["data"] = {"kind": "files", "train": dataset, "text_column": "text"}
    cfg["tasks"] = [
        {"name": "task_a", "labels": ["neg", "pos"]},
        {"name": "task_b", "labels": ["x", "y", "z"]},
    ]
    cfg["epochs"] = 1
    cfg["batch_size"] = 16
    cfg["seed"] = seed
    return cfg


def test_a_job_on_a_remote_store_shares_nothing_on_disk(stack: dict[str, Any]) -> None:
    s3: SeaweedS3 = stack["s3"]
    root: Path = stack["root"]
    with httpx.Client(base_url=stack["url"], headers=auth("alice"), timeout=60) as api:
        r = api.post("/v1/datasets", files={"file": ("reviews.csv", CSV.encode())})
        assert r.status_code == 201, r.text
        dataset = r.json()
        assert _bucket_keys(s3, f"datasets/{dataset['id']}") == [
            f"datasets/{dataset['id']}/data.csv",
            f"datasets/{dataset['id']}/manifest.json",
        ]
        # the API kept no copy: its data directory holds no dataset
        assert not (root / "api-data" / "datasets").exists()

        ids = []
        for seed in (0, 1):
            cfg = _files_job(dataset["source"], seed)
            cfg["onnx"] = {"export": seed == 0}  # the second job: PyTorch only
            r = api.post("/v1/jobs", json=cfg)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        for job_id in ids:
            job = _wait_state(api, job_id, {"succeeded", "failed", "cancelled"}, 240)
            assert job["state"] == "succeeded", job
        job_id = ids[0]
        record = stack["redis"].hgetall(Keys(PREFIX).job(job_id))
        assert record["artifacts"] == f"jobs/{job_id}/a1"

        # the download is the bucket's archive, byte for byte
        r = api.get(f"/v1/jobs/{job_id}/model")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/gzip"
        assert r.content == _bucket_bytes(s3, f"jobs/{job_id}/a1/model.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            names = tar.getnames()
        assert "model/mtl.json" in names and "model/manifest.json" not in names

        r = api.get(f"/v1/jobs/{job_id}/model", params={"format": "onnx"})
        assert r.status_code == 200
        assert r.content == _bucket_bytes(s3, f"jobs/{job_id}/a1/model.onnx.tar.gz")
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            assert not [n for n in tar.getnames() if n.endswith(".safetensors")]
        r = api.get(f"/v1/jobs/{ids[1]}/model", params={"format": "onnx"})
        assert r.status_code == 409 and "has no ONNX export" in r.json()["detail"], r.text
        assert _bucket_keys(s3, f"jobs/{ids[1]}/a1/model.onnx.tar.gz") == []

        r = api.post(f"/v1/jobs/{job_id}/predict", json={"texts": ["good great", "bad poor"]})
        assert r.status_code == 200, r.text
        assert {p["task_a"]["label"] for p in r.json()["predictions"]} <= {"pos", "neg"}

        r = api.get(f"/v1/jobs/{job_id}/tensorboard")
        assert r.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            assert any("events.out.tfevents" in n for n in tar.getnames())

        # the worker's work folder is gone; the checkpoints it keeps are in the bucket
        assert not any((root / "worker-data" / "cache" / "work").iterdir())
        checkpoints = _bucket_keys(s3, f"jobs/{job_id}/a1/checkpoints")
        assert checkpoints and all("/step-" in k for k in checkpoints)
        # the API's data directory: a cache of staged copies, never a job's own folder
        assert not (root / "api-data" / "jobs").exists()

        r = api.post("/v1/ensembles", json={"jobs": ids})
        assert r.status_code == 201, r.text
        ensemble = r.json()
        r = api.post(f"/v1/ensembles/{ensemble['id']}/predict", json={"texts": ["good"]})
        assert r.status_code == 200, r.text
        r = api.get(f"/v1/ensembles/{ensemble['id']}/model")
        assert r.content == _bucket_bytes(s3, f"ensembles/{ensemble['id']}/model.tar.gz")
        r = api.get(f"/v1/ensembles/{ensemble['id']}/model", params={"format": "onnx"})
        assert r.status_code == 409, r.text  # one member has no ONNX export

        assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert _bucket_keys(s3, f"jobs/{job_id}") == []
        # the ensemble keeps its own copy
        r = api.post(f"/v1/ensembles/{ensemble['id']}/predict", json={"texts": ["good"]})
        assert r.status_code == 200, r.text
        assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
        assert _bucket_keys(s3, f"datasets/{dataset['id']}") == []


# ------------------------------------------------------------------------------ separate hosts

NETNS = netns_unavailable()


@pytest.mark.skipif(NETNS is not None, reason=str(NETNS))
def test_a_job_killed_on_host_a_resumes_on_host_b_from_the_bucket(tmp_path: Path) -> None:
    with Lab(["store", "api", "a", "b"]) as lab:
        store, api_host = lab["store"], lab["api"]
        processes: list[Any] = []
        try:
            redis_url, s3 = _store_host(store, tmp_path, processes)
            client = redis.Redis.from_url(redis_url, decode_responses=True)
            envs = {h: _env(redis_url, tmp_path / f"{h}-data", s3) for h in ("api", "a", "b")}
            api_log = tmp_path / "api.log"
            api = api_host.popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                 "--host", api_host.ip, "--port", "8000", "--log-level", "warning"],
                env=envs["api"], log=api_log, cwd=REPO_ROOT,
            )  # fmt: skip
            processes.append(api)
            url = f"http://{api_host.ip}:8000"
            _wait_http(url, api, api_log)
            worker_a = _worker(lab["a"], envs["a"], tmp_path / "worker-a.log", client)
            processes.append(worker_a)

            with httpx.Client(base_url=url, headers=auth("alice"), timeout=60) as http:
                r = http.post("/v1/jobs", json=long_config(steps=120, checkpoint_every=20))
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                key = Keys(PREFIX).job(job_id)
                deadline = time.monotonic() + 180
                while not client.hget(key, "checkpoint"):
                    assert time.monotonic() < deadline, http.get(f"/v1/jobs/{job_id}").json()
                    time.sleep(0.1)
                first = client.hget(key, "checkpoint")
                assert first is not None and first.startswith(f"jobs/{job_id}/a1/checkpoints/")
                kill_tree(worker_a)  # host A's worker and its training process, mid-run
                job = http.get(f"/v1/jobs/{job_id}").json()
                assert job["state"] == "running" and job["progress"]["step"] < 120, job
                a_files = _files_under(tmp_path / "a-data")

                worker_b = _worker(lab["b"], envs["b"], tmp_path / "worker-b.log", client)
                processes.append(worker_b)
                job = _wait_state(http, job_id, {"succeeded", "failed", "cancelled"}, 300)
                assert job["state"] == "succeeded", job
                assert job["attempt"] == 2 and job["restarts"] == 1, job

                record = client.hgetall(key)
                assert record["artifacts"] == f"jobs/{job_id}/a2"
                log_b = (tmp_path / "worker-b.log").read_text()
                assert f"resuming from jobs/{job_id}/a1/checkpoints/step-" in log_b, log_b[-3000:]
                resumed = int(
                    log_b.split(f"resuming from jobs/{job_id}/a1/checkpoints/step-")[1][:8]
                )
                assert resumed >= 20
                # one metric history: the first attempt's logs up to the checkpoint, then the
                # second's (what A logged after it was dropped on resume)
                r = http.get(f"/v1/jobs/{job_id}/metrics", params={"split": "train"})
                items = [m for m in r.json()["items"] if m["type"] == "log"]
                steps = [m["step"] for m in items]
                assert steps == sorted(set(steps)) and steps[-1] == 120, steps
                assert {m["attempt"] for m in items if m["step"] <= resumed} == {1}
                assert {m["attempt"] for m in items if m["step"] > resumed} == {2}

                r = http.get(f"/v1/jobs/{job_id}/model")
                assert r.status_code == 200
                assert r.content == _bucket_bytes(s3, f"jobs/{job_id}/a2/model.tar.gz")
                r = http.post(f"/v1/jobs/{job_id}/predict", json={"texts": ["x"]})
                assert r.status_code == 200, r.text

            # no shared disk: host A never saw the model, the API keeps only a cache
            assert not any("model" in f.split("/")[-2:-1] for f in a_files)
            assert not (tmp_path / "a-data" / "jobs").exists()
            assert not (tmp_path / "b-data" / "jobs").exists()
            assert not (tmp_path / "api-data" / "jobs").exists()
            # the first attempt's checkpoints are gone once the second has won
            assert _bucket_keys(s3, f"jobs/{job_id}/a1") == []
            client.close()
        finally:
            for process in reversed(processes):
                kill_tree(process)


def _store_host(store: Host, tmp_path: Path, processes: list[Any]) -> tuple[str, SeaweedS3]:
    """Redis and the S3 server on the store host."""
    folder = tmp_path / "redis"
    folder.mkdir()
    conf = folder / "redis.conf"
    conf.write_text(
        f'bind {store.ip}\nport 6379\ndir "{folder}"\nappendonly yes\nsave ""\n'
        "requirepass hosts-redis\nprotected-mode yes\nmaxmemory-policy noeviction\n"
    )
    processes.append(
        store.popen([redis_executable(), str(conf)], env=os.environ, log=folder / "log")
    )
    url = f"redis://:hosts-redis@{store.ip}:6379/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + 20
    while True:
        try:
            if client.ping():
                break
        except redis.exceptions.ConnectionError:
            assert time.monotonic() < deadline, (folder / "log").read_text()
            time.sleep(0.1)
    client.close()
    s3 = SeaweedS3(tmp_path / "s3", ip=store.ip, wrap=store.command).start()
    processes.append(s3.process)
    s3.make_bucket(BUCKET)
    return url, s3


def _worker(host: Host, env: dict[str, str], log: Path, client: redis.Redis) -> Any:
    process = host.popen(worker_command(name=f"{host.name}@%h"), env=env, log=log,
                         cwd=REPO_ROOT)  # fmt: skip
    _wait_worker(client, process, log)
    return process
