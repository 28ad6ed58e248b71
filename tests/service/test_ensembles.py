"""/v1/ensembles against the real stack: an ensemble of two succeeded jobs predicts the mean of
their predictions, downloads as an ensemble folder, refuses jobs of other tasks (422 naming
`jobs[i]`), is another key's 404 on every route, and is gone after DELETE; a study's best trials
make one too (the study written straight into Redis: no search is run)."""

from __future__ import annotations

import copy
import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from service.ensembles import best_trials
from service.keys import Keys
from service.studies.records import StudyRecord, TrialKind, TrialRecord, TrialState
from service.studies.spec import StudyCreate
from tests.service.conftest import DUMMY, PREFIX, auth, long_config, submit, wait_for

#: a two-task dummy job of 2 steps (seconds on one CPU thread)
SMALL = copy.deepcopy(DUMMY)
SMALL["data"].update(num_samples=64, eval_samples=32)
SMALL["epochs"] = 1

TEXTS = ["hello world", "a wonderful story about football", "x y z"]


@pytest.fixture(scope="module")
def jobs(service: str) -> Iterator[dict[str, str]]:
    """alice's succeeded jobs: `a` and `b` (same tasks, other seeds), `other` (task_c instead of
    task_b)."""
    other = copy.deepcopy(SMALL)
    other["tasks"] = [{"name": "task_a", "num_classes": 5}, {"name": "task_c", "num_classes": 3}]
    with httpx.Client(base_url=service, headers=auth("alice"), timeout=30) as c:
        ids = {
            "a": submit(c, {**SMALL, "seed": 0})["id"],
            "b": submit(c, {**SMALL, "seed": 1})["id"],
            "other": submit(c, other)["id"],
        }
        for job_id in ids.values():
            assert wait_for(c, job_id, {"succeeded", "failed"}, timeout=180)["state"] == "succeeded"
        yield ids


def _create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/ensembles", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/ensembles/{r.json()['id']}"
    return r.json()


def _ensembles_on_disk(service_env: dict[str, str]) -> set[str]:
    folder = Path(service_env["MTL_DATA_DIR"]) / "ensembles"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_two_jobs_make_an_ensemble_that_predicts_their_mean(
    client: httpx.Client, jobs: dict[str, str], tmp_path: Path
) -> None:
    ens = _create(client, {"name": "pair", "jobs": [jobs["a"], jobs["b"]]})
    assert ens["id"].startswith("ens_") and ens["name"] == "pair"
    assert ens["members"] == [jobs["a"], jobs["b"]]
    assert ens["study_id"] is None and ens["trials"] is None
    assert ens["tasks"] == {"task_a": ["0", "1", "2", "3", "4"], "task_b": ["0", "1", "2"]}
    assert ens["links"]["predict"] == f"/v1/ensembles/{ens['id']}/predict"
    assert client.get(f"/v1/ensembles/{ens['id']}").json() == ens
    listed = client.get("/v1/ensembles").json()
    assert listed["items"][0] == ens and listed["total"] >= 1  # newest first

    answers = {}
    for name, path in (
        ("a", f"/v1/jobs/{jobs['a']}"),
        ("b", f"/v1/jobs/{jobs['b']}"),
        ("ens", f"/v1/ensembles/{ens['id']}"),
    ):
        r = client.post(f"{path}/predict", json={"texts": TEXTS})
        assert r.status_code == 200, r.text
        answers[name] = r.json()
    assert answers["ens"]["job_id"] == ens["id"]
    spread = 0.0
    for row, ra, rb in zip(*(answers[n]["predictions"] for n in ("ens", "a", "b")), strict=True):
        assert set(row) == {"task_a", "task_b"}
        for task, result in row.items():
            probs = result["probabilities"]
            assert list(probs) == ens["tasks"][task]
            for label, p in probs.items():
                pa, pb = ra[task]["probabilities"][label], rb[task]["probabilities"][label]
                assert abs(p - (pa + pb) / 2) < 1e-6
                spread = max(spread, abs(pa - pb))
            assert result["label"] == max(probs, key=probs.__getitem__)
    assert spread > 1e-4  # two different models: the mean is neither

    # the limits of a job's predict
    path = f"/v1/ensembles/{ens['id']}/predict"
    assert client.post(path, json={"texts": []}).status_code == 422
    r = client.post(path, json={"texts": ["x"] * 257})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "texts"]

    # the download: a model/ folder holding the ensemble's mtl.json and its members
    r = client.get(f"/v1/ensembles/{ens['id']}/model")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert "model/members/0/heads.safetensors" in names
    meta = json.loads((tmp_path / "model" / "mtl.json").read_text())
    assert meta["kind"] == "ensemble"
    assert meta["members"] == [
        {"path": "members/0", "weight": 0.5},
        {"path": "members/1", "weight": 0.5},
    ]
    assert [t["name"] for t in meta["tasks"]] == ["task_a", "task_b"]
    from mtl.predict import Predictor

    local = Predictor.load(tmp_path / "model").predict(TEXTS)
    for row, served in zip(local, answers["ens"]["predictions"], strict=True):
        for task in row:
            for label, p in row[task]["probabilities"].items():
                assert abs(p - served[task]["probabilities"][label]) < 1e-6


def test_bad_members_are_named(
    client: httpx.Client, jobs: dict[str, str], service_env: dict[str, str]
) -> None:
    before = _ensembles_on_disk(service_env)
    r = client.post("/v1/ensembles", json={"jobs": [jobs["a"], jobs["other"]]})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "jobs", 1]
    assert error["msg"].startswith(f"jobs[1] (job {jobs['other']}) has other tasks than jobs[0]")
    assert "task 'task_b'" in error["msg"]
    r = client.post("/v1/ensembles", json={"jobs": [jobs["a"], jobs["b"], jobs["other"]]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "jobs", 2]
    assert _ensembles_on_disk(service_env) == before  # nothing left behind

    unknown = "job_00000000000000000000"
    r = client.post("/v1/ensembles", json={"jobs": [jobs["a"], unknown]})
    assert r.status_code == 404 and r.json()["detail"] == f"job {unknown} not found"

    cancelled = submit(client, long_config(steps=5000))["id"]
    client.post(f"/v1/jobs/{cancelled}/cancel")
    wait_for(client, cancelled, {"cancelled"}, timeout=60)
    r = client.post("/v1/ensembles", json={"jobs": [jobs["a"], cancelled]})
    assert r.status_code == 409, r.text
    assert r.json()["detail"].startswith(f"jobs[1] (job {cancelled}) is cancelled")
    assert r.json()["state"] == "cancelled"

    for body, loc in [
        ({"jobs": [jobs["a"]]}, ["body", "jobs"]),
        ({"jobs": [jobs["a"], jobs["a"]]}, ["body", "jobs"]),
        ({"jobs": [jobs["a"], "../etc"]}, ["body", "jobs", 1]),
        ({"jobs": [jobs["a"], jobs["b"]], "top": 2}, ["body", "top"]),
        ({"study": "study_x", "top": "2"}, ["body", "top"]),
        ({"study": "study_x", "top": 0}, ["body", "top"]),
        ({"study": "study_x"}, ["body", "top"]),
        ({}, ["body", "jobs"]),
    ]:
        r = client.post("/v1/ensembles", json=body)
        assert r.status_code == 422, (body, r.text)
        assert loc in [e["loc"] for e in r.json()["detail"]], (body, r.json())
    assert _ensembles_on_disk(service_env) == before


def test_another_key_gets_404_on_every_route(
    client: httpx.Client, bob: httpx.Client, jobs: dict[str, str]
) -> None:
    ens = _create(client, {"jobs": [jobs["a"], jobs["b"]]})
    unknown = "ens_00000000000000000000"
    for method, path, body in [
        ("GET", "", None),
        ("DELETE", "", None),
        ("GET", "/model", None),
        ("POST", "/predict", {"texts": ["x"]}),
    ]:
        theirs = bob.request(method, f"/v1/ensembles/{ens['id']}{path}", json=body)
        missing = client.request(method, f"/v1/ensembles/{unknown}{path}", json=body)
        assert theirs.status_code == missing.status_code == 404, (method, path)
        mine, absent = theirs.json()["detail"], missing.json()["detail"]
        assert mine.replace(ens["id"], "ID") == absent.replace(unknown, "ID")
    assert ens["id"] not in {e["id"] for e in bob.get("/v1/ensembles").json()["items"]}
    r = bob.post("/v1/ensembles", json={"jobs": [jobs["a"], jobs["b"]]})  # alice's jobs
    assert r.status_code == 404 and r.json()["detail"] == f"job {jobs['a']} not found"
    assert client.get(f"/v1/ensembles/{ens['id']}").status_code == 200  # still there
    assert httpx.get(f"{client.base_url}/v1/ensembles/{ens['id']}").status_code == 401


def _trial(number: int, value: float | None, **fields: Any) -> TrialRecord:
    """A trial record (complete unless `state` says otherwise)."""
    fields.setdefault("state", TrialState.COMPLETE)
    fields.setdefault("jobs", [f"job_{number}"])
    return TrialRecord(number=number, value=value, started_at=0.0, **fields)


@pytest.fixture
def study(service_env: dict[str, str], jobs: dict[str, str]) -> Iterator[str]:
    """alice's study, written straight into Redis (no driver runs it): complete search trials
    0 (value 0.9, job b), 1 (0.5, job a) and 3 (0.1, the job of other tasks), a pruned trial 2
    and a baseline better than all of them."""
    keys = Keys(PREFIX)
    study_id = "study_ens0000000000000001"
    spec = StudyCreate.model_validate(
        {
            "base": SMALL,
            "search_space": [{"path": "seed", "int": {"low": 0, "high": 9}}],
            "objective": {"metric": "macro_f1", "direction": "maximize"},
        }
    )
    record = StudyRecord(id=study_id, owner="alice", created_at=time.time(), trials_planned=4)
    trials = [
        _trial(0, 0.9, jobs=[jobs["b"]]),
        _trial(1, 0.5, jobs=[jobs["a"]]),
        _trial(2, None, jobs=[jobs["a"]], state=TrialState.PRUNED),
        _trial(3, 0.1, jobs=[jobs["other"]]),
        _trial(1000, 0.99, jobs=[jobs["other"]], kind=TrialKind.BASELINE, baseline="sum"),
    ]
    db = redis.Redis.from_url(service_env["MTL_REDIS_URL"], decode_responses=True)
    db.hset(
        keys.study(study_id),
        mapping={
            "owner": "alice",
            "record": record.model_dump_json(),
            "spec": spec.model_dump_json(),
        },
    )
    db.zadd(keys.owner_studies("alice"), {study_id: int(record.created_at * 1000)})
    for trial in trials:
        db.hset(keys.study_trials(study_id), str(trial.number), trial.model_dump_json())
    try:
        yield study_id
    finally:
        db.delete(keys.study(study_id), keys.study_trials(study_id))
        db.zrem(keys.owner_studies("alice"), study_id)
        db.close()


def test_a_studys_best_trials_make_an_ensemble(
    client: httpx.Client, bob: httpx.Client, jobs: dict[str, str], study: str
) -> None:
    ens = _create(client, {"name": "best two", "study": study, "top": 2})
    assert ens["members"] == [jobs["b"], jobs["a"]]  # best trial first
    assert ens["study_id"] == study and ens["trials"] == [0, 1]
    r = client.post(f"/v1/ensembles/{ens['id']}/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text

    r = client.post("/v1/ensembles", json={"study": study, "top": 3})  # trial 3: other tasks
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "study"]
    assert error["msg"].startswith(f"job {jobs['other']} (trial 3) has other tasks than job ")
    r = client.post("/v1/ensembles", json={"study": study, "top": 4})
    assert r.status_code == 409 and "3 completed search trials, fewer than top (4)" in r.text
    r = client.post("/v1/ensembles", json={"study": study, "top": 1})  # one job is not enough
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "top"]
    r = bob.post("/v1/ensembles", json={"study": study, "top": 2})
    assert r.status_code == 404 and r.json()["detail"] == f"study {study} not found"


def test_delete_removes_the_record_and_folder_and_outlives_its_jobs(
    client: httpx.Client, jobs: dict[str, str], service_env: dict[str, str]
) -> None:
    a_copy = submit(client, {**SMALL, "seed": 2})["id"]
    assert wait_for(client, a_copy, {"succeeded", "failed"}, timeout=180)["state"] == "succeeded"
    ens = _create(client, {"jobs": [jobs["a"], a_copy]})
    folder = Path(service_env["MTL_DATA_DIR"]) / "ensembles" / ens["id"]
    assert (folder / "model" / "mtl.json").is_file()
    assert client.delete(f"/v1/jobs/{a_copy}").status_code == 204  # the member's job goes
    r = client.post(f"/v1/ensembles/{ens['id']}/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text  # the ensemble holds copies

    assert client.get(f"/v1/ensembles/{ens['id']}/model").status_code == 200
    r = client.delete(f"/v1/ensembles/{ens['id']}")
    assert r.status_code == 204
    assert not folder.exists()
    for method, path, body in [
        ("GET", "", None),
        ("DELETE", "", None),
        ("GET", "/model", None),
        ("POST", "/predict", {"texts": ["x"]}),
    ]:
        r = client.request(method, f"/v1/ensembles/{ens['id']}{path}", json=body)
        assert r.status_code == 404, (method, path, r.text)
    assert ens["id"] not in {e["id"] for e in client.get("/v1/ensembles").json()["items"]}


def test_the_openapi_schema_shows_the_body(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/ensembles"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/EnsembleCreate"
    schemas = spec["components"]["schemas"]
    assert {s["$ref"].rsplit("/", 1)[1] for s in schemas["EnsembleCreate"]["anyOf"]} == {
        "EnsembleFromJobs",
        "EnsembleFromStudy",
    }
    assert schemas["EnsembleFromJobs"]["properties"]["jobs"]["maxItems"] == 16
    assert set(post["responses"]) >= {"201", "404", "409", "422"}


# ------------------------------------------------------------------------------ units


def test_best_trials_selection() -> None:
    trials = [
        _trial(0, 0.5),
        _trial(1, 0.9),
        _trial(2, 0.7),
        _trial(3, 0.9),  # a tie with 1: the lower number first
        _trial(4, 0.99, state=TrialState.PRUNED),
        _trial(5, 0.95, state=TrialState.FAILED),
        _trial(6, None),
        _trial(1000, 1.0, kind=TrialKind.BASELINE, baseline="sum"),
    ]
    assert [t.number for t in best_trials(trials, maximize=True, top=3)] == [1, 3, 2]
    assert [t.number for t in best_trials(trials, maximize=False, top=2)] == [0, 2]
    assert [t.number for t in best_trials(trials, maximize=True, top=10)] == [1, 3, 2, 0]
    assert best_trials([], maximize=True, top=2) == []
