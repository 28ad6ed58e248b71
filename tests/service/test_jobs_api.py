"""Jobs API behaviour against the real stack: cancel, reconnect, idempotency, keys, 422s."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import httpx
import pytest
import redis

from service.embedded import REPO_ROOT
from service.keys import Keys
from tests.service.conftest import (
    DUMMY,
    PREFIX,
    WorkerHandle,
    long_config,
    read_sse,
    submit,
    wait_for,
    wait_step,
)


def test_cancel_running_and_queued(
    client: httpx.Client, service_env: dict[str, str], worker: WorkerHandle
) -> None:
    running = submit(client, long_config(steps=5000, checkpoint_every=10))
    job = wait_step(client, running["id"], 25)
    assert job["state"] == "running"
    queued = submit(client, DUMMY)
    assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 1

    assert job["progress"]["total_steps"] == 5000
    assert job["progress"]["eta"] is not None

    # a queued job is cancelled at once and never starts
    r = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202
    assert r.json() == {"id": queued["id"], "state": "cancelled"}

    asked = time.monotonic()
    r = client.post(f"/v1/jobs/{running['id']}/cancel")
    assert r.status_code == 202
    assert r.json()["state"] == "cancelling"
    again = client.post(f"/v1/jobs/{running['id']}/cancel")  # idempotent
    assert again.status_code == 202 and again.json()["state"] in ("cancelling", "cancelled")

    done = wait_for(client, running["id"], {"cancelled", "failed", "succeeded"}, timeout=30)
    took = time.monotonic() - asked
    assert done["state"] == "cancelled", done
    assert took < 5, f"cancel took {took:.1f}s"
    assert done["progress"]["step"] < 5000
    assert done["error"] == "cancelled by request"
    # the last checkpoint is kept
    assert done["checkpoint_step"] is not None and done["checkpoint_step"] > 0
    ckpt_dir = Path(service_env["MTL_DATA_DIR"]) / "jobs" / running["id"] / "checkpoints"
    assert (ckpt_dir / f"step-{done['checkpoint_step']:08d}").is_dir()
    # cancelling a cancelled job is still fine
    assert client.post(f"/v1/jobs/{running['id']}/cancel").json()["state"] == "cancelled"

    events, _ = read_sse(client, running["id"])
    states = [e["data"]["data"]["state"] for e in events if e.get("event") == "state"]
    assert states == ["queued", "running", "cancelling", "cancelled"]
    assert events[-1] == {**events[-1], "event": "end", "data": {"state": "cancelled"}}

    # the worker takes the cancelled job's message (the queue is empty) and refuses it
    refused = f"job {queued['id']} attempt 1 not started: not-queued cancelled"
    deadline = time.monotonic() + 60
    while refused not in worker.log_text():
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.05)
    db = redis.Redis.from_url(service_env["MTL_REDIS_URL"])
    try:
        assert db.llen(Keys(PREFIX).broker_queue(service_env["MTL_QUEUE_NAME"])) == 0
    finally:
        db.close()
    q = client.get(f"/v1/jobs/{queued['id']}").json()
    assert q["state"] == "cancelled" and q["started_at"] is None
    q_events, _ = read_sse(client, queued["id"])
    assert [e["data"]["data"]["state"] for e in q_events if e.get("event") == "state"] == [
        "queued",
        "cancelled",
    ]


def test_cancel_finished_job_is_409_and_delete(
    client: httpx.Client, service_env: dict[str, str]
) -> None:
    job = submit(client, DUMMY)
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409  # not finished yet
    wait_for(client, job["id"], {"succeeded"})
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409
    assert r.json() == {"detail": f"job {job['id']} already succeeded", "state": "succeeded"}

    job_dir = Path(service_env["MTL_DATA_DIR"]) / "jobs" / job["id"]
    assert (job_dir / "model").is_dir()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert not job_dir.exists()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404
    r2 = redis.Redis.from_url(service_env["MTL_REDIS_URL"])
    keys = Keys(service_env["MTL_KEY_PREFIX"])
    assert not any(r2.exists(k) for k in keys.job_keys(job["id"]))
    r2.close()


def test_reconnect_with_last_event_id(client: httpx.Client) -> None:
    cfg = long_config(steps=120, checkpoint_every=40)
    job = submit(client, cfg)
    first, _ = read_sse(client, job["id"], stop_after=6)  # disconnect mid-run
    assert first[-1].get("event") != "end"
    rest, _ = read_sse(client, job["id"], last_event_id=first[-1]["id"])
    assert rest[-1]["event"] == "end"
    full, _ = read_sse(client, job["id"])
    ids = lambda evs: [e["id"] for e in evs if "id" in e]  # noqa: E731
    assert ids(first) + ids(rest) == ids(full)  # no gap, no duplicate
    steps = [e["data"]["step"] for e in full if e.get("event") == "log"]
    assert steps == sorted(set(steps))
    # ?after= is the same cursor for clients that cannot set headers
    r = client.get(f"/v1/jobs/{job['id']}/events", params={"after": ids(full)[-1]})
    assert r.status_code == 200
    assert "event: end" in r.text and "id:" not in r.text
    bad = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "nope"})
    assert bad.status_code == 422


def test_keep_alive_comments(client: httpx.Client) -> None:
    blocker = submit(client, long_config(steps=5000))
    waiting = submit(client, DUMMY)
    try:
        wait_step(client, blocker["id"], 1)
        started = time.monotonic()
        with client.stream("GET", f"/v1/jobs/{waiting['id']}/events") as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith(":"):
                    break
                assert time.monotonic() - started < 10
        assert any(line.startswith(": ") for line in lines)  # keep-alive while queued
    finally:
        client.post(f"/v1/jobs/{waiting['id']}/cancel")
        client.post(f"/v1/jobs/{blocker['id']}/cancel")
        wait_for(client, blocker["id"], {"cancelled"}, timeout=30)


def test_idempotent_submit(client: httpx.Client, bob: httpx.Client) -> None:
    cfg = copy.deepcopy(DUMMY)
    cfg["seed"] = 7
    first = client.post("/v1/jobs", json=cfg, headers={"Idempotency-Key": "abc-123"})
    second = client.post("/v1/jobs", json=cfg, headers={"Idempotency-Key": "abc-123"})
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers

    other = client.post("/v1/jobs", json={**cfg, "seed": 8}, headers={"Idempotency-Key": "abc-123"})
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]

    # keys are per API key: bob's "abc-123" is his own job
    theirs = bob.post("/v1/jobs", json=cfg, headers={"Idempotency-Key": "abc-123"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]

    listed = client.get("/v1/jobs", params={"limit": 100}).json()["items"]
    assert sum(1 for j in listed if j["id"] == first.json()["id"]) == 1
    for job_id, c in ((first.json()["id"], client), (theirs.json()["id"], bob)):
        c.post(f"/v1/jobs/{job_id}/cancel")


def test_other_key_gets_404_like_unknown(client: httpx.Client, bob: httpx.Client) -> None:
    job = submit(client, DUMMY)
    job_id = job["id"]
    unknown = "job_00000000000000000000"
    for method, path, body in [
        ("GET", "", None),
        ("GET", "/metrics", None),
        ("GET", "/events", None),
        ("POST", "/cancel", None),
        ("DELETE", "", None),
        ("GET", "/model", None),
        ("POST", "/predict", {"texts": ["x"]}),
    ]:
        theirs = bob.request(method, f"/v1/jobs/{job_id}{path}", json=body)
        missing = client.request(method, f"/v1/jobs/{unknown}{path}", json=body)
        assert theirs.status_code == missing.status_code == 404, (method, path)
        assert theirs.json()["detail"].replace(job_id, "ID") == missing.json()["detail"].replace(
            unknown, "ID"
        )
    assert job_id not in {j["id"] for j in bob.get("/v1/jobs").json()["items"]}
    assert job_id in {j["id"] for j in client.get("/v1/jobs").json()["items"]}

    anonymous = httpx.get(f"{client.base_url}/v1/jobs/{job_id}")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(
        f"{client.base_url}/v1/jobs/{job_id}", headers={"Authorization": "Bearer nope-nope"}
    )
    assert wrong.status_code == 401
    client.post(f"/v1/jobs/{job_id}/cancel")


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        (lambda c: c["tasks"][0].update(num_classes=1), ["body", "tasks", 0, "num_classes"]),
        (lambda c: c.update(batch_size=0), ["body", "batch_size"]),
        (lambda c: c.update(bogus=1), ["body", "bogus"]),
        (lambda c: c["optimizer"].update(name="rmsprop") if "optimizer" in c
         else c.update(optimizer={"name": "rmsprop"}), ["body", "optimizer", "name"]),
        (lambda c: c.update(data={"kind": "files", "train": "/etc/passwd"}),
         ["body", "data", "train"]),
        (lambda c: c.update(data={"kind": "files", "train": "dataset:ds_00000000000000000000"}),
         ["body", "data", "train"]),
        (lambda c: c["encoder"].update(random_init=None, model="/etc"),
         ["body", "encoder", "model"]),
    ],
)  # fmt: skip
def test_invalid_config_is_422_naming_the_field(
    client: httpx.Client, change: object, loc: list[object]
) -> None:
    cfg = copy.deepcopy(DUMMY)
    change(cfg)  # type: ignore[operator]
    r = client.post("/v1/jobs", json=cfg)
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["detail"]]
    assert loc in locs, locs


@pytest.mark.parametrize(
    ("change", "loc", "says"),
    [
        (lambda c: c.update(optimizer={"layer_decay": -0.5}), ["body", "optimizer", "layer_decay"],
         "greater than 0"),
        (lambda c: c["tasks"][1].update(depends_on=["nope"]), None,
         "tasks.task_b.depends_on: unknown tasks ['nope']"),
        (lambda c: (c["tasks"][0].update(depends_on=["task_b"]),
                    c["tasks"][1].update(depends_on=["task_a"])), None,
         "cycle: task_a -> task_b -> task_a"),
        (lambda c: c.update(mlm={"weight": 1.0}), None, "mlm needs text"),
        (lambda c: c.update(averaging={"kind": "polyak"}), ["body", "averaging", "kind"], "'ema'"),
        (lambda c: c.update(rdrop={"alpha": -1}), ["body", "rdrop", "alpha"], "greater than"),
    ],
)  # fmt: skip
def test_bad_modeling_options_are_422_naming_the_field(
    client: httpx.Client, change: object, loc: list[object] | None, says: str
) -> None:
    cfg = copy.deepcopy(DUMMY)
    change(cfg)  # type: ignore[operator]
    r = client.post("/v1/jobs", json=cfg)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    if loc is not None:
        assert loc in [e["loc"] for e in detail], detail
    assert any(says in e["msg"] for e in detail), detail


def test_list_filter_and_pagination(client: httpx.Client, bob: httpx.Client) -> None:
    # bob's own namespace keeps the numbers exact
    blocker = submit(bob, long_config(steps=5000))
    ids = [submit(bob, {**DUMMY, "name": f"n{i}"})["id"] for i in range(3)]
    try:
        page = bob.get("/v1/jobs", params={"state": "queued", "limit": 2}).json()
        assert page["total"] >= 3
        assert [j["id"] for j in page["items"]] == ids[::-1][:2]  # newest first
        assert page["next"] is not None
        page2 = httpx.get(page["next"], headers=bob.headers).json()
        assert page2["items"][0]["id"] == ids[0]
        positions = [j["queue_position"] for j in page["items"] + page2["items"][:1]]
        assert positions == sorted(positions, reverse=True) and all(positions)
        bad = bob.get("/v1/jobs", params={"state": "sleeping"})
        assert bad.status_code == 422
    finally:
        for job_id in [*ids, blocker["id"]]:
            bob.post(f"/v1/jobs/{job_id}/cancel")
    wait_for(bob, blocker["id"], {"cancelled"}, timeout=30)
    cancelled = bob.get("/v1/jobs", params={"state": "cancelled", "limit": 100}).json()
    assert {*ids, blocker["id"]} <= {j["id"] for j in cancelled["items"]}


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] is True and ready.json()["workers"]


def test_swagger_example_is_the_example_file(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]
    assert body["required"] is True
    content = body["content"]["application/json"]
    assert content["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert "JobCreate" in spec["components"]["schemas"]
    example = content["examples"]["two_task_dummy"]["value"]
    assert example == json.loads((REPO_ROOT / "app/examples/dummy_job.json").read_text())
    validate = spec["paths"]["/v1/configs/validate"]["post"]["requestBody"]
    assert validate["content"]["application/json"]["schema"] == content["schema"]
    assert client.get("/docs").status_code == 200


def test_concurrent_subscribers_see_the_same_stream(client: httpx.Client, service: str) -> None:
    import threading

    from tests.service.conftest import auth

    job = submit(client, long_config(steps=150, checkpoint_every=50))
    results: dict[str, list[str | None]] = {}

    def follow(name: str, delay: float) -> None:
        time.sleep(delay)
        with httpx.Client(base_url=service, headers=auth("alice"), timeout=60) as c:
            events, _ = read_sse(c, job["id"])
        results[name] = [e.get("id") for e in events]

    threads = [
        threading.Thread(target=follow, args=(name, delay))
        for name, delay in (("early", 0.0), ("late", 1.0), ("later", 2.0))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results["early"] == results["late"] == results["later"]
    assert results["early"][-1] is None  # `end`
    assert len(results["early"]) > 20
