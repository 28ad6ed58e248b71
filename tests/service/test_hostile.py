"""Hostile and broken input: a fuzzer over the whole OpenAPI schema, out-of-range configs, and
uploads that are too large, not UTF-8, binary, enormous in one field or in their column count.

The fuzzer (Schemathesis) calls the API in-process (ASGI) with its lifespan, against the
session's redis-server; everything else talks to the real API (uvicorn) of `conftest.py`, or to
an in-process API with settings of its own (`local_api`).
See docs/reliability.md ("Hostile input and security").
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.main import create_app
from service.embedded import REPO_ROOT, RedisServer, free_port, stop_process
from service.keys import Keys
from service.settings import Settings
from service.storage import Storage
from tests.service.conftest import DUMMY, KEYS, auth, submit, wait_for

# ------------------------------------------------------------------------ in-process API


@contextlib.contextmanager
def local_api(
    redis_server: RedisServer, data_dir: Path, **env: str
) -> Iterator[tuple[TestClient, Settings]]:
    """The API in this process (`TestClient`, lifespan included) on the session's Redis, with
    its settings read from `MTL_*` environment variables as a deployment would (`env` on top
    of the defaults here), its own key prefix and its own queue (no worker takes its jobs)."""
    prefix = f"local{uuid.uuid4().hex[:8]}"
    values = {
        "MTL_REDIS_URL": redis_server.url,
        "MTL_DATA_DIR": str(data_dir),
        "MTL_KEY_PREFIX": prefix,
        "MTL_QUEUE_NAME": f"{prefix}-queue",
        "MTL_API_KEYS": json.dumps(KEYS),
        **env,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("MTL_")]:
            mp.delenv(name)
        for name, value in values.items():
            mp.setenv(name, value)
        app_settings = Settings()
    with TestClient(create_app(app_settings)) as client:
        yield client, app_settings


# ------------------------------------------------------------------------ schemathesis

FUZZ_PREFIX = "mtlfuzz"
# The app is built at import time (Schemathesis makes one test per operation at collection);
# `fuzz_redis` points it at the session's redis-server before the first call starts its
# lifespan. No worker serves its queue: submitted jobs stay queued.
FUZZ_SETTINGS = Settings(
    redis_url=None,
    data_dir=Path(tempfile.gettempdir()) / "mtl-fuzz-unset",
    key_prefix=FUZZ_PREFIX,
    api_keys=KEYS,
    queue_name="mtl-fuzz",
    max_upload_bytes=64 * 1024,
    heartbeat_s=3600,  # one heartbeat written by `fuzz_redis` keeps /readyz at 200
)
FUZZ_APP = create_app(FUZZ_SETTINGS)
schema = schemathesis.openapi.from_dict(
    FUZZ_APP.openapi(),
    config=SchemathesisConfig.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": KEYS["alice"]}}}}
    ),
)
schema.app = FUZZ_APP

#: operations whose bodies pass checks the schema cannot express (the model allow-list,
#: datasets that must exist and parse, cross-field rules such as static weights naming every
#: task, a study's base config and search paths): a schema-valid body may get a 422 there, so
#: "valid data accepted" is not checked
SEMANTIC_CHECKS = {
    ("POST", "/v1/jobs"),
    ("POST", "/v1/configs/validate"),
    ("POST", "/v1/datasets"),
    ("POST", "/v1/studies"),
}


@pytest.fixture(scope="module", autouse=True)
def fuzz_redis(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    import redis
    from schemathesis.python import asgi

    FUZZ_SETTINGS.redis_url = redis_server.url
    FUZZ_SETTINGS.data_dir = tmp_path_factory.mktemp("fuzz")
    client = redis.Redis.from_url(redis_server.url)
    client.zadd(Keys(FUZZ_PREFIX).workers, {"fuzz-worker": int(time.time() * 1000)})
    client.close()
    yield
    asgi.shutdown_lifespans()  # close the app's Redis pool before the server stops


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_fuzz(case: Any) -> None:
    """Every operation of the schema: no 5xx, every answer documented (status, content type,
    headers, body schema), schema-invalid input rejected, auth enforced (`ignored_auth` sends
    the request again without the key and with a wrong one). The event stream is finite here:
    a read timeout ends it (and an id that is not alice's is a 404 before any stream)."""
    excluded = (
        [positive_data_acceptance] if (case.method.upper(), case.path) in SEMANTIC_CHECKS else []
    )
    case.call_and_validate(excluded_checks=excluded, timeout=10)


#: JSON bodies that once made 5xx: lone surrogates (valid JSON escapes no UTF-8 text holds)
#: anywhere in an otherwise sensible body, and deep nesting; generated for every operation
#: that takes a JSON body, so the class stays closed as routes are added
SURROGATES = st.sampled_from(["\\ud800", "\\udfff", "a\\udc00b", "\\ud83d"])


def _json_body_operations() -> list[tuple[str, str]]:
    spec = FUZZ_APP.openapi()
    out = []
    for template, operations in spec["paths"].items():
        for method, op in operations.items():
            content = (op.get("requestBody") or {}).get("content", {})
            if "application/json" in content and "{" not in template:
                out.append((method.upper(), template))
    return out


def _with_escape(value: Any, escape: str, where: int) -> str:
    """`value` as JSON text with the `where`-th string (or key) replaced by one holding
    `escape` (a raw JSON escape sequence)."""
    count = 0

    def walk(v: Any) -> str:
        nonlocal count
        if isinstance(v, str):
            count += 1
            return f'"{escape}"' if count - 1 == where else json.dumps(v)
        if isinstance(v, dict):
            items = []
            for k, item in v.items():
                count += 1
                key = f'"{escape}"' if count - 1 == where else json.dumps(k)
                items.append(f"{key}: {walk(item)}")
            return "{" + ", ".join(items) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(walk(i) for i in v) + "]"
        return json.dumps(v)

    return walk(value)


@pytest.mark.parametrize(("method", "path"), _json_body_operations())
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(escape=SURROGATES, where=st.integers(0, 60), depth=st.integers(1, 60_000))
def test_surrogates_and_deep_nesting_never_make_a_5xx(
    method: str, path: str, escape: str, where: int, depth: int
) -> None:
    base: Any = {"texts": ["x"]} if path.endswith("predict") else {**DUMMY, "name": "x"}
    if path == "/v1/studies":
        base = {"base": DUMMY, "search_space": [{"path": "epochs", "int": {"low": 1, "high": 2}}]}
    headers = {"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"}
    with TestClient(FUZZ_APP) as api:
        for body in (_with_escape(base, escape, where), "[" * depth + "]" * depth):
            r = api.request(method, path, content=body.encode(), headers=headers)
            assert r.status_code < 500, (path, r.status_code, r.text[:300])
            r.json()  # and the answer is valid JSON


def test_every_operation_refuses_a_missing_or_wrong_key() -> None:
    """Every operation in the schema, called without a key, with a wrong one, with a Basic
    header: 401, `WWW-Authenticate: Bearer`; with the right key in the URL: 400 (refused
    whatever else the request carries); both before the body is looked at (the bodies here
    are garbage). No Redis needed: nothing gets that far."""
    spec = FUZZ_APP.openapi()
    client = TestClient(FUZZ_APP, raise_server_exceptions=True)  # no lifespan: no Redis
    attempts = {
        "none": {},
        "wrong": {"Authorization": "Bearer not-a-key-at-all"},
        "empty": {"Authorization": "Bearer "},
        "basic": {"Authorization": "Basic YWxpY2U6YWxpY2Uta2V5LTAwMDE="},
        "key in the URL": {},
    }
    checked = operations_seen = 0
    for template, operations in spec["paths"].items():
        if not template.startswith("/v1/"):
            continue
        path = template.replace("{job_id}", "job_00000000000000000000").replace(
            "{dataset_id}", "ds_00000000000000000000"
        )
        for method in operations:
            operations_seen += 1
            for name, headers in attempts.items():
                params = {"api_key": KEYS["alice"]} if name == "key in the URL" else None
                r = client.request(
                    method.upper(), path, headers=headers, params=params, content=b"\x00garbage"
                )
                if name == "key in the URL":
                    assert r.status_code == 400, (method, path, r.status_code, r.text)
                else:
                    assert r.status_code == 401, (method, path, name, r.status_code, r.text)
                    assert r.headers["www-authenticate"] == "Bearer"
                assert isinstance(r.json()["detail"], str)
                checked += 1
    assert operations_seen >= 17 and checked == operations_seen * len(attempts)


# ------------------------------------------------------------------------ configs

BIG_TASKS = [{"name": f"t{i}", "num_classes": 2} for i in range(10_000)]


def _set(path: str, value: Any) -> Any:
    def change(cfg: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


OUT_OF_RANGE: dict[str, tuple[Any, list[Any]]] = {
    "huge batch size": (_set("batch_size", 10**9), ["body", "batch_size"]),
    "batch size 0": (_set("batch_size", 0), ["body", "batch_size"]),
    "huge max_length": (_set("encoder.max_length", 10**7), ["body", "encoder", "max_length"]),
    "huge epochs": (_set("epochs", 10**8), ["body", "epochs"]),
    "huge max_steps": (_set("max_steps", 10**15), ["body", "max_steps"]),
    "huge eval batch": (_set("eval_batch_size", 10**9), ["body", "eval_batch_size"]),
    "huge dummy data": (
        _set("data.num_samples", 10**12),
        ["body", "data", "dummy", "num_samples"],  # the union tag is part of the path
    ),
    "huge hidden size": (
        _set("encoder.random_init.hidden_size", 10**6),
        ["body", "encoder", "random_init", "hidden_size"],
    ),
    "unlisted random_init key": (
        _set("encoder.random_init.type_vocab_size", 2_000_000_000),
        ["body", "encoder", "random_init", "type_vocab_size"],
    ),
    "NaN learning rate": ("NaN", ["body", "optimizer", "lr"]),
    "infinite learning rate": ("Infinity", ["body", "optimizer", "lr"]),
    "1e400 learning rate": ("1e400", ["body", "optimizer", "lr"]),
    "negative learning rate": (_set("optimizer.lr", -0.1), ["body", "optimizer", "lr"]),
    "string for a number": (_set("epochs", "3"), ["body", "epochs"]),
    "bool for a number": (_set("batch_size", True), ["body", "batch_size"]),
    "0 tasks": (_set("tasks", []), ["body", "tasks"]),
    "10,000 tasks": (_set("tasks", BIG_TASKS), ["body", "tasks"]),
    "unknown top-level field": (_set("bogus", 1), ["body", "bogus"]),
    "unknown nested field": (_set("encoder.bogus", 1), ["body", "encoder", "bogus"]),
    "unknown task field": (
        lambda c: c["tasks"][0].update(weight=2),
        ["body", "tasks", 0, "weight"],
    ),
}


def _queue_state(service_env: dict[str, str]) -> tuple[int, int, int]:
    """(jobs ever queued, jobs queued now, messages waiting in the Celery queue)."""
    import redis

    keys = Keys(service_env["MTL_KEY_PREFIX"])
    r = redis.Redis.from_url(service_env["MTL_REDIS_URL"])
    try:
        celery_queue = f"{service_env['MTL_KEY_PREFIX']}:celery:{service_env['MTL_QUEUE_NAME']}"
        return (int(r.get(keys.queue_seq) or 0), r.zcard(keys.queued), r.llen(celery_queue))
    finally:
        r.close()


@pytest.mark.parametrize("case", list(OUT_OF_RANGE), ids=list(OUT_OF_RANGE))
def test_out_of_range_config_is_422_naming_the_field_and_queues_nothing(
    client: httpx.Client, service_env: dict[str, str], case: str
) -> None:
    change, loc = OUT_OF_RANGE[case]
    if isinstance(change, str):  # a non-finite number: not expressible in strict JSON
        body = json.dumps(DUMMY).replace(
            '"batch_size": 32', f'"batch_size": 32, "optimizer": {{"lr": {change}}}'
        )
    else:
        cfg = copy.deepcopy(DUMMY)
        change(cfg)
        body = json.dumps(cfg)
    jobs_before = client.get("/v1/jobs").json()["total"]
    queue_before = _queue_state(service_env)
    for path in ("/v1/jobs", "/v1/configs/validate"):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (path, r.text[:500])
        errors = r.json()["detail"]
        assert loc in [e["loc"] for e in errors], [e["loc"] for e in errors]
        assert all(isinstance(e["msg"], str) and e["msg"] for e in errors)
    assert client.get("/v1/jobs").json()["total"] == jobs_before
    seq, queued, messages = _queue_state(service_env)
    assert seq == queue_before[0]  # no job was created (the counter counts every create)
    assert queued <= queue_before[1] and messages <= queue_before[2]


# ------------------------------------------------------------------------ uploads

MULTIPART_HEAD = (
    b"--BOUNDARY\r\n"
    b'Content-Disposition: form-data; name="file"; filename="big.csv"\r\n'
    b"Content-Type: text/csv\r\n\r\n"
    b"text,label\r\n"
)


def _raw_upload(
    url: str,
    headers: dict[str, str],
    *,
    declared: int | None,
    total: int,
    chunk: int = 64 * 1024,
    pace_s: float = 0.005,
    timeout: float = 20,
) -> tuple[int, int, bytes]:
    """POST /v1/datasets over a raw socket, sending at most `total` body bytes: with a
    Content-Length of `declared`, or chunked when it is None. Before each chunk it looks
    whether the server has answered already and stops sending if so. Returns (status, body
    bytes sent, the response)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    head = [
        "POST /v1/datasets HTTP/1.1",
        f"Host: {parts.hostname}:{parts.port}",
        "Content-Type: multipart/form-data; boundary=BOUNDARY",
        *(f"{k}: {v}" for k, v in headers.items()),
        f"Content-Length: {declared}" if declared is not None else "Transfer-Encoding: chunked",
    ]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent = 0
    body = MULTIPART_HEAD
    try:
        while sent < total:
            if select.select([sock], [], [], pace_s)[0]:
                break  # the server answered
            piece = body if body else b'"' + b"x" * (chunk - 6) + b'",a\n'
            body = b""
            data = piece if declared is not None else b"%x\r\n%s\r\n" % (len(piece), piece)
            try:
                sock.sendall(data)
            except OSError:  # the server closed the connection after answering
                break
            sent += len(piece)
        response = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in response and time.monotonic() < deadline:
            got = sock.recv(65536)
            if not got:
                break
            response += got
        with contextlib.suppress(OSError):
            sock.settimeout(1)
            response += sock.recv(65536)
    finally:
        sock.close()
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1]), sent, response


def _api_rss(api_url: str) -> int:
    """Resident memory (bytes) of the uvicorn process serving `api_url` (Linux /proc)."""
    port = str(urlsplit(api_url).port)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"uvicorn" in b" ".join(argv) and port.encode() in argv:
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    pytest.skip("cannot find the API process in /proc")


def test_upload_over_the_cap_is_413_before_the_body_is_read(
    service: str, service_env: dict[str, str]
) -> None:
    cap = int(service_env["MTL_MAX_UPLOAD_BYTES"])
    declared = 50 * 1024 * 1024
    # a Content-Length over the cap: answered after the first 64 KiB, the rest never sent
    status, sent, response = _raw_upload(
        service, auth("alice"), declared=declared, total=declared, pace_s=0.05
    )
    assert status == 413, response[:300]
    assert sent <= 4 * 64 * 1024, sent
    # chunked (no length up front): refused once the cap (plus the form's overhead) is passed
    status, sent, response = _raw_upload(service, auth("alice"), declared=None, total=declared)
    assert status == 413, response[:300]
    assert cap < sent < cap + 64 * 1024 + 2 * 1024 * 1024, sent
    print(f"chunked: 413 after {sent} body bytes (cap {cap})")
    assert sent < declared / 10
    # without a key the answer comes before the body too (401 under the JSON body limit)
    status, sent, response = _raw_upload(
        service, {}, declared=512 * 1024, total=512 * 1024, pace_s=0.05
    )
    assert status == 401, response[:300]
    assert b"Authorization: Bearer" in response
    assert sent <= 4 * 64 * 1024, sent


def test_api_memory_stays_flat_under_oversize_uploads(
    service: str, service_env: dict[str, str], client: httpx.Client
) -> None:
    datasets_before = client.get("/v1/datasets").json()["total"]
    _raw_upload(service, auth("alice"), declared=None, total=2 * 1024 * 1024)  # warm up
    before = _api_rss(service)
    offered = 0
    for _ in range(4):
        for declared in (None, 200 * 1024 * 1024):
            status, _, _ = _raw_upload(
                service, auth("alice"), declared=declared, total=20 * 1024 * 1024
            )
            assert status == 413
            offered += 200 * 1024 * 1024 if declared else 20 * 1024 * 1024
    grown = _api_rss(service) - before
    print(f"API RSS {before / 2**20:.1f} MiB, grew {grown / 2**20:.2f} MiB over 8 uploads")
    assert offered > 800 * 1024 * 1024
    assert grown < 24 * 1024 * 1024, f"the API grew by {grown / 2**20:.1f} MiB"
    assert client.get("/v1/datasets").json()["total"] == datasets_before
    folder = Path(service_env["MTL_DATA_DIR"]) / "datasets"
    partial = [d for d in folder.glob("ds_*") if not list(d.glob("data.*"))]
    assert not partial, partial  # nothing half-written left behind


@contextlib.contextmanager
def subprocess_api(
    redis_server: RedisServer, data_dir: Path, log_file: Path, **env: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The API in a uvicorn process of its own (so that its memory, in /proc/<pid>/status, is
    the API's alone), on the session's Redis, with the settings of `local_api` (`env` on top).
    Yields its URL and process."""
    prefix = f"sub{uuid.uuid4().hex[:8]}"
    values = {
        "MTL_REDIS_URL": redis_server.url,
        "MTL_DATA_DIR": str(data_dir),
        "MTL_KEY_PREFIX": prefix,
        "MTL_QUEUE_NAME": f"{prefix}-queue",
        "MTL_API_KEYS": json.dumps(KEYS),
        **env,
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MTL_")}
    environ.update(values, PYTHONPATH=str(REPO_ROOT))
    port = free_port()
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=environ, cwd=str(REPO_ROOT), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log_file.read_text())
            time.sleep(0.1)
        yield url, proc
    finally:
        stop_process(proc, timeout=10)


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes: its resident memory now and at its peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def write_short_rows(path: Path, size: int) -> int:
    """A CSV of `size` bytes or a little less: a header, then short unique rows of text and a
    label (about 33 bytes each); returns the number of data rows."""
    labels = ("pos", "neg", "neutral")
    rows = written = 0
    with open(path, "w") as f:
        written += f.write("text,label\n")
        while True:
            block = "".join(
                f"short review number {i},{labels[i % 3]}\n" for i in range(rows, rows + 10_000)
            )
            if written + len(block) > size:
                break
            written += f.write(block)
            rows += 10_000
        for i in range(rows, rows + 10_000):
            line = f"short review number {i},{labels[i % 3]}\n"
            if written + len(line) > size:
                break
            written += f.write(line)
            rows += 1
    return rows


#: The upload of `test_a_large_upload_is_streamed_in_bounded_memory`: the default cap
#: (benchmarks/upload_memory.py measures 16 and 100 MiB: docs/performance.md).
LARGE_UPLOAD = 100 * 2**20


def test_a_large_upload_is_streamed_in_bounded_memory(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A 100 MiB CSV (the default cap) of 3.2 million short rows, to an API process of its
    own: 201 with every row counted, and the process's peak RSS (VmHWM, reset before the
    upload where the kernel allows) grows by less than 200 MiB; /healthz answers within 2 s
    throughout. The upload is checked streamed (`iter_records` into `inspect_records`): a
    16 MiB file once took the API from 527 to 1438 MiB; 100 MiB would have taken GBs."""
    path = tmp_path / "big.csv"
    rows = write_short_rows(path, LARGE_UPLOAD)
    with subprocess_api(redis_server, tmp_path / "data", tmp_path / "api.log") as (url, proc):
        headers = auth("alice")
        with httpx.Client(base_url=url, headers=headers, timeout=120) as api:
            warm = api.post("/v1/datasets", files={"file": ("warm.csv", b"text,label\nx,a\n")})
            assert warm.status_code == 201, warm.text
            with contextlib.suppress(OSError):  # reset VmHWM to VmRSS (Linux >= 4.0)
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            before, _ = _memory(proc.pid)
            slowest = 0.0
            done = threading.Event()

            def poll_health() -> None:
                nonlocal slowest
                with httpx.Client(base_url=url, timeout=30) as probe:
                    while not done.is_set():
                        started = time.monotonic()
                        assert probe.get("/healthz").status_code == 200
                        slowest = max(slowest, time.monotonic() - started)
                        done.wait(0.1)

            poller = threading.Thread(target=poll_health, daemon=True)
            poller.start()
            started = time.monotonic()
            try:
                with open(path, "rb") as f:
                    r = api.post("/v1/datasets", files={"file": ("big.csv", f)})
            finally:
                done.set()
                poller.join(timeout=30)
            took = time.monotonic() - started
            after, peak = _memory(proc.pid)
            assert r.status_code == 201, r.text[:500]
            dataset = r.json()
            grown = peak - before
            print(
                f"{path.stat().st_size / 2**20:.0f} MiB, {rows} rows: {took:.1f} s; API RSS "
                f"{before / 2**20:.0f} MiB before, peak +{grown / 2**20:.1f} MiB, after "
                f"+{(after - before) / 2**20:.1f} MiB; slowest /healthz {slowest * 1000:.0f} ms"
            )
            assert dataset["rows"] == rows and dataset["size_bytes"] == path.stat().st_size
            assert dataset["label_values"]["label"] == ["neg", "neutral", "pos"]
            assert dataset["capped"] == {"text": True, "label": False}
            assert grown < 200 * 2**20, f"the API grew by {grown / 2**20:.0f} MiB"
            assert slowest < 2.0, slowest
            assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204


BROKEN: dict[str, tuple[str, bytes, int, str]] = {
    "invalid UTF-8": ("bad.csv", b"text,label\n\xff\xfe caf\xe9,a\n", 422, "not valid UTF-8"),
    "UTF-16": (
        "utf16.csv",
        "text,label\nhello,a\n".encode("utf-16"),
        422,
        "save the file as UTF-8",
    ),
    "NUL byte (CSV)": ("nul.csv", b"text,label\nab\x00c,a\n", 422, "NUL byte"),
    "NUL byte (JSONL)": ("nul.jsonl", b'{"text": "a\x00b", "label": "a"}\n', 422, "NUL byte"),
    "binary": ("model.csv", bytes(range(256)) * 16, 422, ""),
    "empty file": ("empty.csv", b"", 422, "empty"),
    "empty JSONL": ("empty.jsonl", b"", 422, "empty"),
    "header only": ("header.csv", b"text,label\n", 422, "no data rows"),
    "not JSON lines": ("x.jsonl", b"{not json}\n", 422, "not valid JSON"),
    "JSONL array": ("x.jsonl", b"[1, 2]\n", 422, "expected a JSON object"),
    "unknown format": ("notes.txt", b"text\nhello\n", 422, "format"),
    "lone surrogate (JSONL)": (
        "s.jsonl",
        b'{"text": "a\\ud800b", "label": "a"}\n',
        422,
        "row 1, column 'text'",
    ),
    "deep nesting (JSONL)": ("deep.jsonl", b"[" * 50_000 + b"]" * 50_000 + b"\n", 422, "deeply"),
    "10 MB field": ("big.csv", b"text,label\n" + b"x" * 10_000_000 + b",a\n", 413, ""),
    "a million columns": (
        "wide.csv",
        (",".join(f"c{i}" for i in range(1_000_000)) + "\n").encode(),
        413,
        "",
    ),
    # read streamed: rows before the problem have been parsed (and counted) when it is met
    "invalid UTF-8 after 30 000 rows": (
        "late.csv",
        b"text,label\n" + b"ok,a\n" * 30_000 + b"bad \xff,a\n",
        422,
        "row 30001, column 'text': not valid UTF-8",
    ),
    "NUL after 10 000 rows (JSONL)": (
        "late.jsonl",
        b'{"text": "ok"}\n' * 10_000 + b'{"text": "a\x00"}\n',
        422,
        "row 10001: contains a NUL byte (line 10001)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN), ids=list(BROKEN))
def test_broken_uploads_get_a_clear_4xx(
    client: httpx.Client, service_env: dict[str, str], case: str
) -> None:
    """On the service (upload cap 200 kB): a clear 4xx, the message names the problem (and
    the row), nothing is stored."""
    filename, content, status, words = BROKEN[case]
    folder = Path(service_env["MTL_DATA_DIR"]) / "datasets"
    before = set(folder.iterdir()) if folder.exists() else set()
    total = client.get("/v1/datasets").json()["total"]
    r = client.post("/v1/datasets", files={"file": (filename, content)})
    assert r.status_code == status, r.text[:500]
    if status == 422:
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "file"]
        assert words.lower() in detail["msg"].lower(), detail["msg"]
    else:
        assert "large" in r.text.lower()  # "Content Too Large" / "larger than the upload cap"
    assert (set(folder.iterdir()) if folder.exists() else set()) == before
    assert client.get("/v1/datasets").json()["total"] == total


@pytest.fixture(scope="module")
def roomy_api(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Settings]]:
    """An API whose upload cap (32 MiB) lets the 10 MB field and the million columns through
    to the dataset checks."""
    with local_api(
        redis_server, tmp_path_factory.mktemp("roomy"), MTL_MAX_UPLOAD_BYTES=str(32 * 2**20)
    ) as api:
        yield api


WIDE_AND_LONG: dict[str, tuple[str, bytes, str]] = {
    "10 MB field (CSV)": (
        "big.csv",
        b"text,label\nshort,a\n" + b"x" * 10_000_000 + b",a\n",
        "row 2, column 'text': a value of 10000000 characters; at most 100000",
    ),
    "10 MB field (JSONL)": (
        "big.jsonl",
        json.dumps({"text": "x" * 10_000_000, "label": "a"}).encode() + b"\n",
        "row 1, column 'text': a value of 10000000 characters; at most 100000",
    ),
    "a million columns (CSV)": (
        "wide.csv",
        (",".join(f"c{i}" for i in range(10**6)) + "\n" + ",".join("1" * 10**6) + "\n").encode(),
        "1000000 columns; at most 1000",
    ),
    "a million keys (JSONL)": (
        "wide.jsonl",
        json.dumps({f"c{i}": 1 for i in range(10**6)}).encode() + b"\n",
        "row 1: 1000000 keys; at most 1000",
    ),
}


@pytest.mark.parametrize("case", list(WIDE_AND_LONG), ids=list(WIDE_AND_LONG))
def test_wide_or_long_uploads_under_the_cap_are_422(
    roomy_api: tuple[TestClient, Settings], case: str
) -> None:
    """Under a larger cap the same files reach the dataset checks: a 422 naming the row (and
    column), fast, and nothing stored (MTL_MAX_DATASET_COLUMNS, MTL_MAX_FIELD_CHARS)."""
    client, app_settings = roomy_api
    filename, content, message = WIDE_AND_LONG[case]
    started = time.monotonic()
    r = client.post("/v1/datasets", files={"file": (filename, content)}, headers=auth("alice"))
    took = time.monotonic() - started
    assert r.status_code == 422, r.text[:500]
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "file"] and message in detail["msg"], detail
    assert took < 15, f"{took:.1f}s"
    datasets_dir = app_settings.data_dir / "datasets"
    assert not any(datasets_dir.iterdir()) if datasets_dir.exists() else True
    assert client.get("/v1/datasets", headers=auth("alice")).json()["total"] == 0


# --------------------------------------------------------------- no 5xx from odd JSON text

SURROGATE = '"\\ud800"'  # a JSON escape of a lone surrogate: valid JSON, no UTF-8 text


def test_lone_surrogates_and_deep_nesting_in_bodies_are_422(client: httpx.Client) -> None:
    """A job `name` with a lone surrogate (submit and validate), the same in predict texts, a
    body nested 50 000 levels deep: a clear 422 (once a 500 from an encoder or a
    RecursionError, or from the 422 handler itself echoing the input); nothing queued."""
    total = client.get("/v1/jobs").json()["total"]
    body = json.dumps({**DUMMY, "name": "x"}).replace('"name": "x"', f'"name": {SURROGATE}')
    for path in ("/v1/jobs", "/v1/configs/validate"):
        r = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (path, r.text)
        detail = r.json()["detail"][0]
        assert detail["loc"] == ["body", "name"] and "Unicode" in detail["msg"]
    deep = "[" * 50_000 + "]" * 50_000
    r = client.post("/v1/jobs", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "deeply" in r.json()["detail"][0]["msg"], r.text
    assert client.get("/v1/jobs").json()["total"] == total
    # a 422 that echoes a surrogate in its input (an unknown field with such a value)
    odd = json.dumps({**DUMMY, "bogus": "x"}).replace('"bogus": "x"', f'"bogus": {SURROGATE}')
    r = client.post("/v1/jobs", content=odd, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    job = submit(client, DUMMY)
    wait_for(client, job["id"], {"succeeded"})
    texts = f'{{"texts": ["fine", {SURROGATE}]}}'
    r = client.post(
        f"/v1/jobs/{job['id']}/predict", content=texts, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    assert "text 1 is not valid Unicode" in r.json()["detail"][0]["msg"]


def test_seeds_beyond_numpys_range_are_422(client: httpx.Client) -> None:
    """`data.seed: 2**80` was accepted and failed the job with an internal overflow."""
    for where, loc in (("data", ["body", "data", "dummy", "seed"]), (None, ["body", "seed"])):
        cfg = json.loads(json.dumps(DUMMY))
        (cfg[where] if where else cfg)["seed"] = 2**80
        r = client.post("/v1/configs/validate", json=cfg)
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == loc


def test_an_upload_whose_record_cannot_be_written_leaves_no_file(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Redis away when the record is written (the dataset store's client points at a port
    where nothing listens, after the key check): 503, and the stored file is removed."""
    import redis.asyncio as aioredis

    with local_api(redis_server, tmp_path / "data") as (api, settings):
        dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        api.app.state.datasets.redis = dead  # type: ignore[attr-defined]
        r = api.post(
            "/v1/datasets",
            files={"file": ("a.csv", b"text,label\nhello,a\n")},
            headers={"Authorization": f"Bearer {KEYS['alice']}"},
        )
        assert r.status_code == 503, r.text
        folder = settings.data_dir / "datasets"
        assert not folder.exists() or not any(folder.iterdir())


def test_orphan_dataset_folders_are_swept_at_start(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At start the API removes dataset folders with no record that have not changed for an
    hour (an API killed between storing a file and writing its record, or before removing a
    refused one), and logs each; a folder with a record, a younger one (an upload in
    progress), one whose file changed lately and a folder that is not a dataset's are kept.
    With Redis away the sweep logs and removes nothing."""
    import anyio
    import redis.asyncio as aioredis

    from app.api.routes.datasets import sweep_orphans
    from service.datasets import AsyncDatasetStore, new_dataset_id

    data = tmp_path / "data"
    prefix = f"sweep{uuid.uuid4().hex[:8]}"
    with local_api(redis_server, data, MTL_KEY_PREFIX=prefix) as (api, _):
        r = api.post(
            "/v1/datasets", files={"file": ("a.csv", b"text,label\nhi,a\n")}, headers=auth()
        )
        assert r.status_code == 201, r.text
        recorded = r.json()["id"]
    folders = data / "datasets"
    hours_ago = time.time() - 2 * 3600

    def make(name: str, *, folder_age: float, file_age: float) -> Path:
        folder = folders / name
        folder.mkdir(exist_ok=True)
        file = folder / "data.csv"
        if not file.exists():
            file.write_text("text\nx\n")
        os.utime(file, (file_age, file_age))
        os.utime(folder, (folder_age, folder_age))
        return folder

    now = time.time()
    orphan = make(new_dataset_id(), folder_age=hours_ago, file_age=hours_ago)
    young = make(new_dataset_id(), folder_age=now - 600, file_age=now - 600)
    file_changed = make(new_dataset_id(), folder_age=hours_ago, file_age=now - 60)
    not_ours = make("notes", folder_age=hours_ago, file_age=hours_ago)
    with_record = make(recorded, folder_age=hours_ago, file_age=hours_ago)
    with (
        caplog.at_level(logging.WARNING, logger="app.api.routes.datasets"),
        local_api(redis_server, data, MTL_KEY_PREFIX=prefix) as (api, _),
    ):
        assert api.get(f"/v1/datasets/{recorded}", headers=auth()).status_code == 200
    assert not orphan.exists()
    assert young.is_dir() and file_changed.is_dir() and not_ours.is_dir() and with_record.is_dir()
    assert orphan.name in caplog.text and young.name not in caplog.text

    # Redis away: the sweep logs and keeps everything (the API starts all the same)
    orphan = make(new_dataset_id(), folder_age=hours_ago, file_age=hours_ago)
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    store = AsyncDatasetStore(dead, Keys(prefix), Storage(None, data, data / "cache"))
    with caplog.at_level(logging.WARNING, logger="app.api.routes.datasets"):
        assert anyio.run(sweep_orphans, store) == []
    assert orphan.is_dir() and "sweep of orphan dataset folders stopped" in caplog.text


# ------------------------------------------------------------------------- job budget


def test_jobs_over_the_resource_budget_are_422(client: httpx.Client) -> None:
    """Parameters and training memory are estimated on submit (`mtl/budget.py`) against
    `MTL_MAX_JOB_PARAMS` (2e9) and `MTL_MAX_JOB_MEMORY_GIB` (80): the hardening round's 10.7
    billion-parameter config, and a small model at a batch whose activations need hundreds of
    GiB, are 422s that say how much; nothing is queued."""
    huge = json.loads(json.dumps(DUMMY))
    huge["encoder"] = {
        "random_init": {
            "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64,
            "intermediate_size": 16384, "vocab_size": 250_000, "max_position_embeddings": 8192,
        },
        "max_length": 8192,
    }  # fmt: skip
    huge["data"].update(num_samples=1_000_000, seq_len=8192)
    wide = json.loads(json.dumps(DUMMY))
    wide["encoder"]["max_length"] = 128
    wide["data"]["seq_len"] = 128
    wide["batch_size"] = 4096
    wide["encoder"]["random_init"].update(
        hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=24
    )
    total = client.get("/v1/jobs").json()["total"]
    for cfg, loc, words in (
        (huge, ["body", "encoder"], "10,7"),
        (wide, ["body"], "GiB) to train, over this service's limit of 80 GiB"),
    ):
        for path in ("/v1/jobs", "/v1/configs/validate"):
            r = client.post(path, json=cfg)
            assert r.status_code == 422, (path, r.text)
            detail = r.json()["detail"][0]
            assert detail["loc"] == loc and words in detail["msg"], detail
    assert client.get("/v1/jobs").json()["total"] == total
    study = {
        "base": DUMMY,
        "search_space": [{"path": "batch_size", "int": {"low": 8, "high": 4096}}],
    }
    study["base"] = {**DUMMY, "encoder": wide["encoder"], "data": wide["data"]}
    r = client.post("/v1/studies", json=study)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "search_space", 0, "int"]
