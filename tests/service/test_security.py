"""Security: no pickle a client can reach, no remote code and no SSRF through model names,
per-key isolation on every route, keys only in the header and compared in constant time,
per-key job limits, CORS, and the compose file's Redis.
See docs/reliability.md ("Hostile input and security")."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from service.embedded import REPO_ROOT, RedisServer
from service.keys import Keys
from service.settings import Settings
from tests.service.conftest import DUMMY, KEYS, WorkerHandle, auth, submit, wait_for
from tests.service.test_hostile import local_api

# ------------------------------------------------------------------------ no pickle


def test_celery_is_json_only_in_the_api_and_the_worker(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The worker's Celery app (as `celery -A worker.celery_app` loads it) and the API's
    publisher: JSON for tasks and results, JSON the only content accepted."""
    code = (
        "import json; from worker.celery_app import celery_app as a; c = a.conf; "
        "print(json.dumps([c.task_serializer, c.result_serializer, list(c.accept_content), "
        "c.result_accept_content, c.event_serializer]))"
    )
    env = {**os.environ, "MTL_REDIS_URL": "redis://127.0.0.1:1/0", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    task, result, accept, result_accept, events = json.loads(out.stdout.strip().splitlines()[-1])
    assert (task, result, accept, events) == ("json", "json", ["json"], "json")
    assert result_accept in (None, ["json"])  # None: falls back to accept_content
    with local_api(redis_server, tmp_path) as (client, _):
        conf = client.app.state.celery.conf  # type: ignore[attr-defined]
        assert conf.task_serializer == conf.result_serializer == "json"
        assert list(conf.accept_content) == ["json"]


class _Tripwire:
    """Unpickling this creates `path`: proof that something ran pickle on it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_the_worker_refuses_a_pickled_message(
    service_env: dict[str, str], worker: WorkerHandle, tmp_path: Path
) -> None:
    """A pickle message put straight on the worker's queue (what someone who reaches Redis
    could do) is refused unread: the worker logs the refusal and the payload never runs."""
    from service.queue import TASK_NAME, make_celery

    marker = tmp_path / "unpickled"
    producer = make_celery(
        Settings(
            redis_url=service_env["MTL_REDIS_URL"],
            key_prefix=service_env["MTL_KEY_PREFIX"],
            queue_name=service_env["MTL_QUEUE_NAME"],
        )
    )
    log_before = worker.log_text()
    try:
        producer.send_task(
            TASK_NAME,
            args=[_Tripwire(str(marker)), 1],
            queue=service_env["MTL_QUEUE_NAME"],
            serializer="pickle",
        )
    finally:
        producer.close()
    deadline = time.monotonic() + 90  # behind a running job, if any
    refusal = "Refusing to deserialize untrusted content of type pickle"
    while refusal not in worker.log_text()[len(log_before) :]:
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.2)
    assert not marker.exists()
    assert worker.process is not None and worker.process.poll() is None  # still serving


def test_unsafe_loading_is_checked_at_the_source() -> None:
    """`torch.load` without `weights_only=True` and `trust_remote_code=True` are looked for in
    the source by tests/test_boundaries.py (not repeated here): this only makes sure those
    checks exist."""
    import tests.test_boundaries as boundaries

    for name in (
        "test_every_torch_load_passes_weights_only_true",
        "test_the_torch_load_check_catches_unsafe_calls",
        "test_no_trust_remote_code",
    ):
        assert callable(getattr(boundaries, name)), name


def test_torch_is_at_least_2_10() -> None:
    """torch >= 2.10: `torch.load` defaults to `weights_only=True` (since 2.6) and 2.10 is
    the floor the project tests on. Both the declared bound and the installed version."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    torch_req = next(  # the `train` extra's (the installs with torch all include it)
        Requirement(r)
        for r in project["optional-dependencies"]["train"]
        if Requirement(r).name == "torch"
    )
    floors = [Version(s.version) for s in torch_req.specifier if s.operator in (">=", "==", "~=")]
    assert floors and min(floors) >= Version("2.10"), str(torch_req)
    from importlib.metadata import version

    assert Version(version("torch")).release >= (2, 10)


def test_weights_written_by_a_job_are_safetensors(
    client: httpx.Client, service_env: dict[str, str]
) -> None:
    """What a job writes: the exported model and every checkpoint keep their weights as
    safetensors; the only pickle-format files are the optimizer, scheduler and loop state of
    a checkpoint, which `mtl.checkpoint` loads with `weights_only=True` (the source check
    above). Nothing a client uploads is ever loaded with pickle."""
    job = submit(client, {**DUMMY, "name": "safetensors"})
    done = wait_for(client, job["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    job_dir = Path(service_env["MTL_DATA_DIR"]) / "jobs" / job["id"]
    model = job_dir / "model"
    assert (model / "model.safetensors").is_file() and (model / "heads.safetensors").is_file()
    checkpoints = sorted(d for d in (job_dir / "checkpoints").iterdir() if d.is_dir())
    assert checkpoints
    pickled = {
        p.relative_to(job_dir)
        for p in job_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
    }
    for path in pickled:
        assert path.parts[0] == "checkpoints", path
        assert path.name in ("optimizer.pt", "scheduler.pt", "extra.pt"), path
    for ckpt in checkpoints:
        assert (ckpt / "model.safetensors").is_file()
    client.delete(f"/v1/jobs/{job['id']}")


# ------------------------------------------------------------------------ models, remote code

MODEL_LOC = ["body", "encoder", "model"]
REFUSED_MODELS = {
    "https URL": "https://huggingface.co/bert-base-uncased",
    "http URL (metadata service)": "http://169.254.169.254/latest/meta-data/",
    "file URL": "file:///etc/passwd",
    "other scheme": "s3://bucket/model",
    "scheme-less URL": "//evil.example/model",
    "absolute path": "/etc",
    "relative path": "../../../../etc",
    "home path": "~/.cache/huggingface",
    "dot path": "./models/x",
    "windows path": "C:\\models\\x",
    "three-part id": "org/model/extra",
    "id not in the allow-list": "bert-base-uncased",
    "org id not in the allow-list": "sentence-transformers/all-mpnet-base-v2",
}


def _with_model(name: str) -> dict[str, Any]:
    cfg = copy.deepcopy(DUMMY)
    cfg["encoder"] = {"model": name, "max_length": 32}
    return cfg


@pytest.mark.parametrize("random_init", [False, True], ids=["pretrained", "random_init"])
@pytest.mark.parametrize("case", list(REFUSED_MODELS), ids=list(REFUSED_MODELS))
def test_model_names_outside_the_allow_list_are_422(
    client: httpx.Client, case: str, random_init: bool
) -> None:
    """Also with `random_init`: its tokenizer comes from `encoder.model` (a job once read the
    tokenizer files of a directory the tenant named this way). The answer says "not allowed"
    and nothing about the path."""
    cfg = _with_model(REFUSED_MODELS[case])
    if random_init:
        cfg["encoder"]["random_init"] = copy.deepcopy(DUMMY["encoder"]["random_init"])
    total = client.get("/v1/jobs").json()["total"]
    for path in ("/v1/jobs", "/v1/configs/validate"):
        r = client.post(path, json=cfg)
        assert r.status_code == 422, (path, r.text)
        detail = r.json()["detail"]
        assert [e["loc"] for e in detail] == [MODEL_LOC]
        assert detail[0]["msg"].startswith("model not allowed")
        assert REFUSED_MODELS[case] not in detail[0]["msg"]
    assert client.get("/v1/jobs").json()["total"] == total


def test_an_allowed_model_id_is_accepted(client: httpx.Client) -> None:
    cfg = _with_model("sentence-transformers/all-MiniLM-L6-v2")
    r = client.post("/v1/configs/validate", json=cfg)
    assert r.status_code == 200, r.text


def test_local_models_only_under_the_model_roots_and_only_safetensors(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    good = root / "good"
    good.mkdir(parents=True)
    (good / "config.json").write_text("{}")
    (good / "model.safetensors").write_bytes(b"")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    mixed = root / "mixed"
    mixed.mkdir()
    (mixed / "model.safetensors").write_bytes(b"")
    (mixed / "training_args.bin").write_bytes(b"")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    (root / "file.safetensors").write_bytes(b"")
    with local_api(
        redis_server,
        tmp_path / "data",
        MTL_MODEL_ROOTS=json.dumps([str(root)]),
        MTL_ALLOWED_MODELS=json.dumps(["org/allowed"]),
    ) as (api, _):

        def check(name: str) -> httpx.Response:
            return api.post("/v1/configs/validate", json=_with_model(name), headers=auth())

        assert check(str(good)).status_code == 200
        assert check(str(root / "x" / ".." / "good")).status_code == 200
        assert check("org/allowed").status_code == 200
        for name, words in [
            (str(pickled), "pickle-format weights (pytorch_model.bin)"),
            (str(mixed), "pickle-format weights (training_args.bin)"),
            (str(outside), "only under the service's model roots"),
            (str(root / "escape"), "only under the service's model roots"),  # a symlink out
            (str(root / ".." / "outside"), "only under the service's model roots"),
            (str(root / "file.safetensors"), "only under the service's model roots"),
            (str(root / "missing"), "only under the service's model roots"),
            ("/etc", "only under the service's model roots"),
            ("org/other", "not allowed here"),
            ("sentence-transformers/all-MiniLM-L6-v2", "not allowed here"),  # not in this list
        ]:
            r = check(name)
            assert r.status_code == 422, (name, r.text)
            detail = r.json()["detail"]
            assert detail[0]["loc"] == MODEL_LOC and words in detail[0]["msg"], (name, detail)


REMOTE_CODE = {
    "top level": (lambda c: c.update(trust_remote_code=True), ["body", "trust_remote_code"]),
    "encoder": (
        lambda c: c["encoder"].update(trust_remote_code=True),
        ["body", "encoder", "trust_remote_code"],
    ),
    "random_init": (
        lambda c: c["encoder"]["random_init"].update(trust_remote_code=True),
        ["body", "encoder", "random_init", "trust_remote_code"],
    ),
    "random_init auto_map": (
        lambda c: c["encoder"]["random_init"].update(auto_map={"AutoModel": "evil.Model"}),
        ["body", "encoder", "random_init", "auto_map"],
    ),
    "random_init other key": (
        lambda c: c["encoder"]["random_init"].update(name_or_path="https://evil.example/m"),
        ["body", "encoder", "random_init", "name_or_path"],
    ),
    "task": (
        lambda c: c["tasks"][0].update(trust_remote_code=True),
        ["body", "tasks", 0, "trust_remote_code"],
    ),
    "data": (
        lambda c: c["data"].update(trust_remote_code=True),
        ["body", "data", "dummy", "trust_remote_code"],
    ),
}


@pytest.mark.parametrize("case", list(REMOTE_CODE), ids=list(REMOTE_CODE))
def test_trust_remote_code_is_refused_anywhere(client: httpx.Client, case: str) -> None:
    """Unknown fields are errors at every level of the config, `encoder.random_init`
    included (a free-form BertConfig dict otherwise: the service allows only its size,
    dropout and activation fields)."""
    change, loc = REMOTE_CODE[case]
    cfg = copy.deepcopy(DUMMY)
    change(cfg)
    total = client.get("/v1/jobs").json()["total"]
    for path in ("/v1/jobs", "/v1/configs/validate"):
        r = client.post(path, json=cfg)
        assert r.status_code == 422, (path, r.text)
        assert loc in [e["loc"] for e in r.json()["detail"]], r.json()["detail"]
    assert client.get("/v1/jobs").json()["total"] == total


# ------------------------------------------------------------------------ isolation


def _csv() -> bytes:
    rows = [f'"{w} {t}",{s}' for w, s in (("love", "pos"), ("hate", "neg")) for t in "abcd"]
    return ("text,label\n" + "\n".join(rows * 4) + "\n").encode()


def _snapshot(response: httpx.Response) -> tuple[int, str | None, bytes]:
    return response.status_code, response.headers.get("content-type"), response.content


def test_other_keys_get_exactly_the_answer_for_an_unknown_id(
    client: httpx.Client, bob: httpx.Client
) -> None:
    """Every per-job and per-dataset route, called with bob's key on alice's finished job
    (with its model and TensorBoard files) and her dataset: the same status, content type and
    body bytes as once alice has deleted them, i.e. as for an id that does not exist."""
    dataset = client.post("/v1/datasets", files={"file": ("d.csv", _csv())}).json()
    job = submit(client, {**DUMMY, "name": "isolation"})
    assert wait_for(client, job["id"], {"succeeded", "failed"})["state"] == "succeeded"
    jid, did = job["id"], dataset["id"]
    # alice can reach everything
    for path in ("", "/config", "/metrics", "/model", "/tensorboard"):
        assert client.get(f"/v1/jobs/{jid}{path}").status_code == 200, path
    assert client.get(f"/v1/datasets/{did}").status_code == 200

    on_files = copy.deepcopy(DUMMY)
    on_files["tasks"] = [{"name": "label", "labels": ["neg", "pos"]}]
    on_files["data"] = {"kind": "files", "train": f"dataset:{did}"}
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", f"/v1/jobs/{jid}", {}),
        ("GET", f"/v1/jobs/{jid}/config", {}),
        ("GET", f"/v1/jobs/{jid}/metrics", {}),
        ("GET", f"/v1/jobs/{jid}/metrics?task=task_a&split=validation", {}),
        ("GET", f"/v1/jobs/{jid}/events", {}),
        ("GET", f"/v1/jobs/{jid}/events", {"headers": {"Last-Event-ID": "1-0"}}),
        ("GET", f"/v1/jobs/{jid}/model", {}),
        ("GET", f"/v1/jobs/{jid}/tensorboard", {}),
        ("POST", f"/v1/jobs/{jid}/predict", {"json": {"texts": ["hello"]}}),
        ("POST", f"/v1/jobs/{jid}/cancel", {}),
        ("DELETE", f"/v1/jobs/{jid}", {}),
        ("GET", f"/v1/datasets/{did}", {}),
        ("DELETE", f"/v1/datasets/{did}", {}),
        ("POST", "/v1/jobs", {"json": on_files}),
        ("POST", "/v1/configs/validate", {"json": on_files}),
    ]
    total_before = bob.get("/v1/jobs").json()["total"]
    theirs = [_snapshot(bob.request(m, p, **kw)) for m, p, kw in requests]
    # still there: bob deleted and cancelled nothing
    assert client.get(f"/v1/jobs/{jid}").json()["state"] == "succeeded"
    assert client.get(f"/v1/datasets/{did}").status_code == 200
    assert jid not in {j["id"] for j in bob.get("/v1/jobs?limit=100").json()["items"]}
    assert did not in {d["id"] for d in bob.get("/v1/datasets?limit=100").json()["items"]}
    assert bob.get("/v1/jobs").json()["total"] == total_before  # bob's submit made no job

    assert client.delete(f"/v1/jobs/{jid}").status_code == 204
    assert client.delete(f"/v1/datasets/{did}").status_code == 204
    for who in (bob, client):
        unknown = [_snapshot(who.request(m, p, **kw)) for m, p, kw in requests]
        for (method, path, _), mine, gone in zip(requests, theirs, unknown, strict=True):
            assert mine == gone, (method, path, mine, gone)
    statuses = {status for status, _, _ in theirs}
    assert statuses == {404, 422}, statuses  # 422: the dataset named in a config


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hmac.compare_digest` against every configured key, with no early exit, whether the
    presented key matches the first, the last or none."""
    import hmac

    import app.api.deps as deps
    from app.core.errors import Unauthorized

    settings = Settings(api_keys={"a": "key-aaaaaaaa", "b": "key-bbbbbbbb", "c": "key-cccccccc"})
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", spy)
    for presented, owner in [("key-aaaaaaaa", "a"), ("key-cccccccc", "c"), ("nope-nope", None)]:
        calls.clear()
        if owner is None:
            with pytest.raises(Unauthorized):
                deps.authenticate(settings, f"Bearer {presented}")
        else:
            assert deps.authenticate(settings, f"Bearer {presented}") == owner
        assert len(calls) == 3 and all(a == presented.encode() for a, _ in calls)
    # and the source never compares a key with ==
    import inspect

    source = inspect.getsource(deps.authenticate)
    assert "compare_digest" in source
    assert not re.search(r"(token|key)\s*==|==\s*(token|key)", source)


@pytest.mark.parametrize(
    "param",
    ["api_key", "token", "access_token", "apikey", "key", "bearer", "X-Api-Key", "anything"],
)
def test_keys_in_the_query_string_are_refused(
    client: httpx.Client, service: str, param: str
) -> None:
    """A credential-like parameter name, or any parameter whose value is an API key: 400,
    alone or next to a valid header (`?bearer=` and `?X-Api-Key=` next to a header were
    accepted), on the API and on the other paths too."""
    message = "API keys are accepted only in the Authorization header, never in the URL"
    for method, path, kw in [
        ("GET", "/v1/jobs", {}),
        ("GET", "/v1/datasets", {}),
        ("GET", "/v1/jobs/job_00000000000000000000/events", {}),
        ("POST", "/v1/jobs", {"json": DUMMY}),
        ("GET", "/metrics", {}),
        ("GET", "/", {}),
    ]:
        # the key only in the URL
        r = httpx.request(method, f"{service}{path}", params={param: KEYS["alice"]}, **kw)
        assert r.status_code == 400, (path, r.text)
        assert r.json() == {"detail": message}
        # the key in the URL as well as in the header: still refused
        r = client.request(method, path, params={param: KEYS["alice"]}, **kw)
        assert r.status_code == 400 and r.json() == {"detail": message}, (path, r.text)
    assert client.get("/v1/jobs", params={"limit": 1}).status_code == 200  # other params pass


def test_access_logs_never_carry_a_query_string(redis_server: RedisServer, tmp_path: Path) -> None:
    """uvicorn's access log (at info) under the app: the path is logged, the query is not."""
    from tests.service.test_faults_stack import ApiProcess

    env = {
        "MTL_REDIS_URL": redis_server.url,
        "MTL_DATA_DIR": str(tmp_path / "data"),
        "MTL_KEY_PREFIX": f"logs{os.getpid()}",
        "MTL_API_KEYS": json.dumps(KEYS),
    }
    api = ApiProcess(env, tmp_path / "api.log", log_level="info")
    api.start()
    try:
        httpx.get(f"{api.url}/v1/jobs", params={"bearer": KEYS["alice"]}, headers=auth())
        httpx.get(f"{api.url}/v1/jobs", params={"limit": "3"}, headers=auth())
    finally:
        api.stop()
    text = (tmp_path / "api.log").read_text()
    assert '"GET /v1/jobs?… HTTP/1.1" 400' in text and '"GET /v1/jobs?… HTTP/1.1" 200' in text
    assert KEYS["alice"] not in text and "limit=3" not in text


# ------------------------------------------------------------------------ per-key job limit


def test_active_jobs_per_key_are_limited(redis_server: RedisServer, tmp_path: Path) -> None:
    """MTL_MAX_ACTIVE_JOBS_PER_KEY=3 (no worker serves this API's queue, so jobs stay
    queued): the 4th submit is a 429 with Retry-After and creates nothing; other keys are not
    affected; a replayed Idempotency-Key still answers; a cancelled job frees a place."""
    assert Settings().max_active_jobs_per_key == 20  # the default
    with local_api(redis_server, tmp_path, MTL_MAX_ACTIVE_JOBS_PER_KEY="3") as (api, settings):
        assert settings.max_active_jobs_per_key == 3
        alice, bob = auth("alice"), auth("bob")
        ids = []
        for i in range(3):
            r = api.post("/v1/jobs", json=DUMMY, headers={**alice, "Idempotency-Key": f"k{i}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        redis_keys = Keys(settings.key_prefix)
        import redis

        store = redis.Redis.from_url(redis_server.url)
        seq = store.get(redis_keys.queue_seq)
        r = api.post("/v1/jobs", json=DUMMY, headers=alice)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == str(settings.retry_after_s)
        assert r.json() == {
            "detail": "this API key already has 3 queued or running jobs, the limit is 3: "
            "wait for one to finish, or cancel one"
        }
        assert store.get(redis_keys.queue_seq) == seq  # nothing was created
        assert api.get("/v1/jobs", headers=alice).json()["total"] == 3
        # a retry of an accepted submit is answered, not limited
        replay = api.post("/v1/jobs", json=DUMMY, headers={**alice, "Idempotency-Key": "k1"})
        assert replay.status_code == 202 and replay.json()["id"] == ids[1]
        # the limit is per key
        assert api.post("/v1/jobs", json=DUMMY, headers=bob).status_code == 202
        # a cancelled job no longer counts
        assert api.post(f"/v1/jobs/{ids[0]}/cancel", headers=alice).json()["state"] == "cancelled"
        assert api.post("/v1/jobs", json=DUMMY, headers=alice).status_code == 202
        assert api.post("/v1/jobs", json=DUMMY, headers=alice).status_code == 429
        store.close()


def test_the_job_limit_is_atomic(redis_server: RedisServer) -> None:
    """50 concurrent creates against a limit of 5 (each one Lua script: count and add):
    exactly 5 jobs."""
    import redis.asyncio as aioredis

    from service.async_store import AsyncJobStore, NewJob

    keys = Keys("atomic" + str(os.getpid()))

    async def run() -> list[str]:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        store = AsyncJobStore(client, keys)
        try:
            results = await asyncio.gather(
                *(
                    store.create(
                        NewJob(
                            owner="alice",
                            name=None,
                            config_json="{}",
                            max_attempts=1,
                            max_active=5,
                        )
                    )
                    for _ in range(50)
                )
            )
            return [created.outcome for created in results]
        finally:
            await client.aclose()

    outcomes = asyncio.run(run())
    assert outcomes.count("created") == 5 and outcomes.count("limited") == 45


# ------------------------------------------------------------------------ CORS


def _preflight(api: Any, origin: str) -> httpx.Response:
    return api.options(
        "/v1/jobs",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_no_cors_headers_by_default(redis_server: RedisServer, tmp_path: Path) -> None:
    with local_api(redis_server, tmp_path) as (api, settings):
        assert settings.cors_origins == []
        for origin in ("https://ui.example", "http://127.0.0.1:8000", "null"):
            r = _preflight(api, origin)
            assert "access-control-allow-origin" not in r.headers, r.headers
            r = api.get("/v1/jobs", headers={**auth(), "Origin": origin})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_only_for_the_listed_origins(redis_server: RedisServer, tmp_path: Path) -> None:
    listed = "https://ui.example"
    with local_api(
        redis_server, tmp_path, MTL_CORS_ORIGINS=json.dumps([listed, "http://localhost:5173"])
    ) as (api, _):
        for origin in ("https://evil.example", "https://ui.example.evil.example", "null"):
            r = _preflight(api, origin)
            assert "access-control-allow-origin" not in r.headers, (origin, r.headers)
            r = api.get("/v1/jobs", headers={**auth(), "Origin": origin})
            assert "access-control-allow-origin" not in r.headers, origin
        r = _preflight(api, listed)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == listed
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-credentials" not in r.headers
        r = api.get("/v1/jobs", headers={**auth(), "Origin": listed})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == listed
        # a page on the listed origin can read the 401 too
        r = api.get("/v1/jobs", headers={"Origin": listed})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == listed


@pytest.mark.parametrize(
    "origins", [["*"], ["https://ui.example/"], ["ui.example"], ["https://*.example"]]
)
def test_cors_origins_must_be_explicit(origins: list[str]) -> None:
    with pytest.raises(ValidationError, match="explicit scheme://host"):
        Settings(cors_origins=origins)


# ------------------------------------------------------------------------ compose


def test_compose_redis_is_reached_only_with_its_password() -> None:
    """tests/service/test_compose.py checks the password flag, the absence of `ports` on
    Redis and the API's loopback binding; here: every service that talks to Redis has the
    password in its URL (compose refuses to start without it) and nothing binds Redis to a
    host port through another service."""
    import yaml

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, svc in services.items():
        url = (svc.get("environment") or {}).get("MTL_REDIS_URL")
        if url is not None:
            assert url.startswith("redis://:${REDIS_PASSWORD:?"), (name, url)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
            assert "6379" not in str(port), (name, port)
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")


# ------------------------------------------------------------------------ file modes


def test_files_the_service_writes_are_its_users_alone(
    client: httpx.Client, service_env: dict[str, str]
) -> None:
    """An upload (the API) and a job (the worker: checkpoints, model, TensorBoard files): under
    the data directory every folder is 0700 and every file 0600 (they were 0755 / 0644 under a
    default umask: any local user could read every tenant's data)."""
    r = client.post("/v1/datasets", files={"file": ("m.csv", b"text,label\nhello,a\nbye,b\n")})
    assert r.status_code == 201, r.text
    job = submit(client, DUMMY)
    assert wait_for(client, job["id"], {"succeeded"})["state"] == "succeeded"
    assert client.get(f"/v1/jobs/{job['id']}/model").status_code == 200  # an archive too
    data_dir = Path(service_env["MTL_DATA_DIR"])
    seen = {"dirs": 0, "files": 0}
    wide = []
    for path in [data_dir, *data_dir.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode & 0o777
        kind = "dirs" if path.is_dir() else "files"
        seen[kind] += 1
        if mode & 0o077:
            wide.append(f"{path.relative_to(data_dir)}: {mode:o}")
    assert seen["dirs"] > 5 and seen["files"] > 10, seen
    assert not wide, wide[:20]


def test_share_with_group_opens_files_to_the_group(tmp_path: Path) -> None:
    code = (
        "import os, pathlib; from service.settings import Settings; "
        f"s = Settings(data_dir=pathlib.Path({str(tmp_path / 'd')!r}), share_with_group=True); "
        "s.private_files(); p = s.data_dir / 'f'; p.write_text('x'); "
        "print(oct(s.data_dir.stat().st_mode & 0o777), oct(p.stat().st_mode & 0o777))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0o750", "0o640"]
