"""Studies against the real stack: real redis-server, real worker processes (a second one
started here), the API in a subprocess. Tiny dummy configs: a trial trains in seconds."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import DUMMY, WorkerHandle, auth

TERMINAL = {"succeeded", "failed", "cancelled"}


def base_config(**over: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(DUMMY)
    cfg["optimizer"] = {"name": "adam", "lr": 0.002}
    cfg.update(over)
    return cfg


def study_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "test study",
        "base": base_config(),
        "search_space": [
            {"path": "optimizer.lr", "float": {"low": 5e-4, "high": 5e-3, "log": True}},
            {"path": "weighting.name", "choice": ["sum", "famo"]},
        ],
        "budget": {"trials": 4, "parallel": 2},
        "pruner": "none",
    }
    body.update(over)
    return body


def wait_study(
    client: httpx.Client, study_id: str, states: set[str], timeout: float = 180
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        study = client.get(f"/v1/studies/{study_id}").json()
        if study["state"] in states:
            return study
        if time.monotonic() > deadline:
            raise AssertionError(f"study {study_id} still {study['state']}: {study}")
        time.sleep(0.2)


@pytest.fixture
def second_worker(service_env: dict[str, str], tmp_path: Path) -> Iterator[WorkerHandle]:
    handle = WorkerHandle(service_env, tmp_path)
    handle.count = 200
    handle.start()
    yield handle
    handle.stop()


def job_intervals(client: httpx.Client, job_ids: list[str]) -> list[tuple[float, float]]:
    out = []
    for job_id in job_ids:
        job = client.get(f"/v1/jobs/{job_id}").json()
        out.append((job["started_at"], job["finished_at"]))
    return out


def test_a_study_searches_runs_baselines_and_gives_a_verdict(
    client: httpx.Client, second_worker: WorkerHandle, tmp_path: Path
) -> None:
    r = client.post("/v1/studies", json=study_body())
    assert r.status_code == 202, r.text
    study = r.json()
    assert study["state"] == "queued" and study["trials_planned"] == 4
    assert r.headers["location"] == f"/v1/studies/{study['id']}"

    done = wait_study(client, study["id"], TERMINAL)
    assert done["state"] == "succeeded", done
    trials = done["trials"]
    search = [t for t in trials if t["kind"] == "search"]
    baselines = {t["baseline"]: t for t in trials if t["kind"] == "baseline"}
    assert sorted(t["number"] for t in search) == [0, 1, 2, 3]
    assert all(t["state"] == "complete" and len(t["jobs"]) == 1 for t in search)
    assert set(baselines) == {"single:task_a", "single:task_b", "sum"}
    assert all(t["state"] == "complete" for t in baselines.values())
    # the leaderboard: completed search trials best first
    values = [t["value"] for t in search]
    assert values == sorted(values, reverse=True)
    assert done["best_trial"] == search[0]["number"] and done["best_value"] == values[0]
    assert done["best_params"] == search[0]["params"]
    assert set(done["best_params"]) == {"optimizer.lr", "weighting.name"}
    assert (done["trials_started"], done["trials_done"], done["failures"]) == (4, 4, 0)

    # trials are ordinary jobs of the same owner, with study and trial on the record
    for trial in search:
        job = client.get(f"/v1/jobs/{trial['jobs'][0]}").json()
        assert job["study_id"] == study["id"] and job["trial"] == trial["number"]
        assert job["state"] == "succeeded"
        config = client.get(f"/v1/jobs/{job['id']}/config").json()
        assert config["optimizer"]["lr"] == pytest.approx(trial["params"]["optimizer.lr"])
        assert config["weighting"]["name"] == trial["params"]["weighting.name"]
        # the objective is the mean macro-F1 of the checkpoint the job exported
        final = job["final_metrics"]["validation"]["mean"]["macro_f1"]
        assert trial["value"] == pytest.approx(final, abs=1e-6)
    single = client.get(f"/v1/jobs/{baselines['single:task_a']['jobs'][0]}/config").json()
    assert [t["name"] for t in single["tasks"]] == ["task_a"]
    summed = client.get(f"/v1/jobs/{baselines['sum']['jobs'][0]}/config").json()
    assert summed["weighting"] == {"name": "sum"} and summed["gradient"]["name"] == "none"
    # a best trial that already summed is its own `sum` baseline: nothing trained twice
    reused = done["best_params"]["weighting.name"] == "sum"
    assert (baselines["sum"]["same_as"] == done["best_trial"]) is reused
    assert (baselines["sum"]["jobs"] == search[0]["jobs"]) is reused

    # two workers: two trials ran at the same time
    ivals = job_intervals(client, [t["jobs"][0] for t in search])
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(ivals) for b in ivals[i + 1 :]), (
        ivals
    )

    verdict = done["verdict"]
    assert verdict["split"] == "validation" and verdict["metric"] == "macro_f1"
    gains = []
    for task in ("task_a", "task_b"):
        v = verdict["tasks"][task]
        assert v["difference"] == pytest.approx(v["multi_task"] - v["single_task"])
        gains.append((v["multi_task"] - v["single_task"]) / v["single_task"])
        assert v["sum"] is not None
    assert verdict["delta_mtl"] == pytest.approx(100 * sum(gains) / 2)
    assert verdict["objective_best"] == done["best_value"]
    assert verdict["objective_sum"] == baselines["sum"]["value"]

    # the study's model is its best trial's
    r = client.post(f"/v1/studies/{study['id']}/predict", json={"texts": ["a b c"]})
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == done["model_job"] == search[0]["jobs"][0]
    r = client.get(f"/v1/studies/{study['id']}/model")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"

    # the event stream: every trial queued and finished, a best, the end
    events = read_study_events(client, study["id"])
    kinds = [(e.get("event"), (e.get("data") or {}).get("data", {}).get("event")) for e in events]
    assert kinds[-1][0] == "end" and events[-1]["data"] == {"state": "succeeded"}
    queued = [
        e for e in events if e.get("event") == "trial" and e["data"]["data"]["event"] == "queued"
    ]
    finished = [
        e for e in events if e.get("event") == "trial" and e["data"]["data"]["event"] == "finished"
    ]
    # 4 search trials, 3 baselines (a reused one is finished without being queued)
    assert len(finished) == 7 and len(queued) == 7 - reused
    assert any(e.get("event") == "best" for e in events)
    ids = [e["id"] for e in events if "id" in e]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(
        ids
    )
    # resumable: after the third event, the rest and nothing else
    rest = read_study_events(client, study["id"], last_event_id=ids[2])
    assert [e["id"] for e in rest if "id" in e] == ids[3:]

    listed = client.get("/v1/studies").json()
    assert study["id"] in [s["id"] for s in listed["items"]]

    r = client.delete(f"/v1/studies/{study['id']}")
    assert r.status_code == 204
    assert client.get(f"/v1/studies/{study['id']}").status_code == 404
    assert client.get(f"/v1/jobs/{search[0]['jobs'][0]}").status_code == 404


def read_study_events(
    client: httpx.Client, study_id: str, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with client.stream(
        "GET", f"/v1/studies/{study_id}/events", headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "":
                if current:
                    if "data" in current:
                        current["data"] = json.loads(current["data"])
                    events.append(current)
                    if current.get("event") == "end":
                        break
                current = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                current[field] = value[1:] if value.startswith(" ") else value
    return events


# ------------------------------------------------------------------------- bad requests

BAD: dict[str, tuple[Callable[[dict[str, Any]], None], list[Any]]] = {
    "unknown path": (
        lambda b: b["search_space"].append({"path": "optimizer.nope", "choice": [1, 2]}),
        ["body", "search_space", 2, "path"],
    ),
    "unknown task": (
        lambda b: b["search_space"].append(
            {"path": "tasks.nope.lr", "float": {"low": 0.001, "high": 0.01}}
        ),
        ["body", "search_space", 2, "path"],
    ),
    "value out of range": (
        lambda b: b["search_space"].append({"path": "epochs", "int": {"low": 0, "high": 3}}),
        ["body", "search_space", 2, "int"],
    ),
    "bad choice": (
        lambda b: b["search_space"][1].update(choice=["sum", "x"]),
        ["body", "search_space", 1, "choice", 1],
    ),
    "searched twice": (
        lambda b: b["search_space"].append({"path": "weighting.name", "choice": ["sum"]}),
        ["body", "search_space", 2, "path"],
    ),
    "two kinds": (
        lambda b: b["search_space"].append(
            {"path": "epochs", "int": {"low": 1, "high": 2}, "choice": [1]}
        ),
        ["body", "search_space", 2],
    ),
    "objective task": (
        lambda b: b.update(objective={"tasks": ["nope"]}),
        ["body", "objective", "tasks"],
    ),
    "objective labels": (
        lambda b: b.update(objective={"labels": {"task_a": ["7"]}}),
        ["body", "objective", "labels", "task_a"],
    ),
    "unknown metric": (
        lambda b: b.update(objective={"metric": "auc"}),
        ["body", "objective", "metric"],
    ),
    "bad base": (lambda b: b["base"].update(epochs="3"), ["body", "base", "epochs"]),
    "data path": (
        lambda b: b["search_space"].append(
            {"path": "data.num_samples", "int": {"low": 64, "high": 128}}
        ),
        None,
    ),
    "grid with a float range": (lambda b: b.update(sampler="grid"), ["body", "sampler"]),
    "zero trials": (lambda b: b.update(budget={"trials": 0}), ["body", "budget", "trials"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_studies_are_422_naming_the_field(client: httpx.Client, case: str) -> None:
    body = study_body()
    change, loc = BAD[case]
    change(body)
    before = client.get("/v1/studies").json()["total"]
    r = client.post("/v1/studies", json=body)
    if loc is None:  # allowed: only the data files and task definitions are fixed
        assert r.status_code == 202, r.text
        client.post(f"/v1/studies/{r.json()['id']}/cancel")
        return
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail[0]["loc"][: len(loc)] == loc, detail
    assert isinstance(detail[0]["msg"], str) and detail[0]["msg"]
    assert client.get("/v1/studies").json()["total"] == before


def test_other_keys_get_404_on_every_study_route(client: httpx.Client, bob: httpx.Client) -> None:
    r = client.post(
        "/v1/studies",
        json=study_body(
            budget={"trials": 1, "parallel": 1}, baselines={"single_task": False, "sum": False}
        ),
    )
    assert r.status_code == 202
    sid = r.json()["id"]
    routes = [
        ("GET", f"/v1/studies/{sid}"),
        ("GET", f"/v1/studies/{sid}/events"),
        ("POST", f"/v1/studies/{sid}/cancel"),
        ("DELETE", f"/v1/studies/{sid}"),
        ("GET", f"/v1/studies/{sid}/model"),
        ("POST", f"/v1/studies/{sid}/predict"),
    ]
    for method, path in routes:
        body = {"texts": ["x"]} if path.endswith("predict") else None
        r = bob.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.json()["detail"] == f"study {sid} not found"
    assert sid not in [s["id"] for s in bob.get("/v1/studies").json()["items"]]
    done = wait_study(client, sid, TERMINAL)
    assert done["state"] == "succeeded" and done["verdict"] is None
    assert auth("alice")  # (keys are per owner)


# --------------------------------------------------------------- cancel, prune, failures


def grid_seed(space: dict[str, list[Any]], last: Any, path: str) -> int:
    """A grid-sampler seed under which `path = last` is the grid's last point (Optuna's own
    sampler, in memory, predicts the order the service's will follow)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for seed in range(50):
        study = optuna.create_study(sampler=optuna.samplers.GridSampler(space, seed=seed))
        dists = {p: optuna.distributions.CategoricalDistribution(v) for p, v in space.items()}
        order = []
        for _ in range(len(next(iter(space.values())))):
            trial = study.ask(dists)
            order.append(trial.params[path])
            with contextlib.suppress(RuntimeError):  # the grid's study.stop() at its end
                study.tell(trial, 0.0)
        if order[-1] == last:
            return seed
    raise AssertionError("no such seed")


def test_cancel_stops_the_running_trial_and_starts_no_more(client: httpx.Client) -> None:
    slow = base_config(max_steps=3000, eval_every=50, log_every=5)
    slow["data"]["num_samples"] = 4096
    slow["batch_size"] = 8
    body = study_body(base=slow, budget={"trials": 3, "parallel": 1})
    sid = client.post("/v1/studies", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while True:  # the first trial trains
        trials = client.get(f"/v1/studies/{sid}").json()["trials"]
        if trials and trials[0]["jobs"]:
            job = client.get(f"/v1/jobs/{trials[0]['jobs'][0]}").json()
            if job["progress"]["step"] >= 3:
                break
        assert time.monotonic() < deadline, trials
        time.sleep(0.1)
    r = client.post(f"/v1/studies/{sid}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelling"
    done = wait_study(client, sid, TERMINAL, timeout=60)
    assert done["state"] == "cancelled", done
    assert [t["state"] for t in done["trials"]] == ["cancelled"]  # and no second trial
    job = client.get(f"/v1/jobs/{done['trials'][0]['jobs'][0]}").json()
    assert job["state"] == "cancelled" and job["progress"]["step"] < 3000
    assert client.post(f"/v1/studies/{sid}/cancel").json()["state"] == "cancelled"
    events = read_study_events(client, sid)
    assert events[-1]["data"] == {"state": "cancelled"}


def test_pruning_stops_a_trial_that_is_clearly_behind(client: httpx.Client) -> None:
    """Two good learning rates, then one that cannot learn: the median pruner (two complete
    trials to compare with) stops the third at an early evaluation."""
    lrs = [0.003, 0.004, 1e-9]
    seed = grid_seed({"optimizer.lr": lrs}, 1e-9, "optimizer.lr")
    base = base_config(max_steps=160, eval_every=16, log_every=8)
    body = study_body(
        base=base,
        search_space=[{"path": "optimizer.lr", "choice": lrs}],
        sampler="grid",
        seed=seed,
        pruner="median",
        budget={"trials": 3, "parallel": 1},
        baselines={"single_task": False, "sum": False},
    )
    r = client.post("/v1/studies", json=body)
    assert r.status_code == 202, r.text
    done = wait_study(client, r.json()["id"], TERMINAL)
    assert done["state"] == "succeeded", done
    by_lr = {t["params"]["optimizer.lr"]: t for t in done["trials"]}
    bad = by_lr[1e-9]
    assert bad["number"] == 2 and bad["state"] == "pruned", bad
    assert by_lr[0.003]["state"] == by_lr[0.004]["state"] == "complete"
    job = client.get(f"/v1/jobs/{bad['jobs'][0]}").json()
    assert job["state"] == "cancelled" and job["progress"]["step"] < 160  # stopped early
    assert bad["intermediate"] is not None and bad["last_step"] < 160
    assert bad["intermediate"] < min(by_lr[lr]["value"] for lr in (0.003, 0.004))
    assert done["best_params"]["optimizer.lr"] in (0.003, 0.004)


@pytest.mark.parametrize("max_failures", [1, 0])
def test_a_failed_trial_is_recorded_and_the_budget_decides(
    client: httpx.Client, max_failures: int
) -> None:
    """A trial without validation data has no score: it fails with the reason. Within the
    failure budget the study goes on and succeeds; past it the study fails, saying why."""
    space = {"data.eval_samples": [128, 0]}
    seed = grid_seed(space, 128, "data.eval_samples")  # the failing one first
    body = study_body(
        search_space=[{"path": "data.eval_samples", "choice": [128, 0]}],
        sampler="grid",
        seed=seed,
        budget={"trials": 2, "parallel": 1, "max_failures": max_failures},
        baselines={"single_task": False, "sum": False},
    )
    r = client.post("/v1/studies", json=body)
    assert r.status_code == 202, r.text
    done = wait_study(client, r.json()["id"], TERMINAL)
    failed = [t for t in done["trials"] if t["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["params"] == {"data.eval_samples": 0}
    assert failed[0]["error"] == "no validation score"
    assert done["failures"] == 1
    if max_failures:
        assert done["state"] == "succeeded" and done["trials_done"] == 2, done
        assert done["best_params"] == {"data.eval_samples": 128}
    else:
        assert done["state"] == "failed" and done["trials_started"] == 1, done
        assert "failure budget" in done["error"]


# ----------------------------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def study_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private stack (its own Redis, API and two workers): this test kills its parts."""
    from tests.service.test_faults_stack import Stack

    stack = Stack(tmp_path_factory.mktemp("study-stack"))
    second = WorkerHandle(stack.env, stack.dir)
    second.count = 300
    try:
        stack.start()
        second.start()
        yield stack
    finally:
        second.stop()
        stack.stop()


@pytest.mark.slow
def test_every_trial_runs_exactly_once_through_kills_and_restarts(study_stack: Any) -> None:
    """A training process killed mid-trial, the API restarted and Redis killed and restarted
    from its append-only file, all during one study: it completes, and every trial ran as
    exactly one job (the killed one resumed as its attempt 2)."""
    from tests.service.test_faults import running_attempt, wait_until

    stack = study_stack
    base = base_config(max_steps=120, eval_every=20, log_every=10)
    base["batch_size"] = 8
    base["data"]["num_samples"] = 2048
    body = study_body(
        base=base,
        budget={"trials": 4, "parallel": 2},
        baselines={"single_task": False, "sum": True},
    )
    with stack.client() as c:
        r = c.post("/v1/studies", json=body)
        assert r.status_code == 202, r.text
        sid = r.json()["id"]

        def first_job() -> str | None:
            trials = c.get(f"/v1/studies/{sid}").json()["trials"]
            return trials[0]["jobs"][0] if trials and trials[0]["jobs"] else None

        job_id = wait_until(first_job, "the first trial's job", timeout=60)
        with stack.db() as db:
            pid = running_attempt(db, job_id, 1)
            wait_until(lambda: int(db.hget(f"mtltest:job:{job_id}", "step") or 0) >= 30,
                       "the first trial to train", timeout=60)  # fmt: skip
        os.kill(pid, signal.SIGKILL)  # the training process dies mid-trial

    stack.api.kill()  # the API goes away and comes back mid-study
    stack.api.start()

    time.sleep(1.0)
    stack.kill_redis()  # Redis dies: the drivers, the workers and the jobs wait for it
    stack.restart_redis()  # and it comes back from its append-only file

    with stack.client() as c:
        done = wait_study(c, sid, TERMINAL, timeout=300)
        assert done["state"] == "succeeded", done
        search = [t for t in done["trials"] if t["kind"] == "search"]
        assert sorted(t["number"] for t in search) == [0, 1, 2, 3]
        assert all(t["state"] == "complete" and len(t["jobs"]) == 1 for t in search)
        # exactly one job per trial, nothing else of the study's
        trial_jobs = [j for t in done["trials"] for j in t["jobs"]]
        listed = c.get("/v1/jobs", params={"limit": 100}).json()["items"]
        of_study = [j for j in listed if j["study_id"] == sid]
        assert sorted(j["id"] for j in of_study) == sorted(set(trial_jobs))
        assert len({(j["trial"]) for j in of_study}) == len(of_study)
        killed = c.get(f"/v1/jobs/{job_id}").json()
        assert killed["state"] == "succeeded" and killed["attempt"] == 2, killed


def test_the_optuna_journal_is_json_and_never_pickled(redis_server: Any) -> None:
    """Optuna's journal storage would save a pickled snapshot every so often; the service's
    backend writes none and reads none, and a fresh process replays the journal instead."""
    import optuna
    import redis

    from worker.optuna_journal import journal_storage

    prefix = f"journaltest-{os.getpid()}"
    storage = journal_storage(redis_server.url, prefix)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for _ in range(120):  # past Optuna's snapshot interval
        trial = study.ask(dist)
        study.tell(trial, trial.params["x"])
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = {k.decode() for k in client.scan_iter(match=f"{prefix}:*", count=1000)}
        assert f"{prefix}:snapshot" not in keys
        logs = [k for k in keys if k.startswith(f"{prefix}:log:")]
        assert len(logs) > 240
        for key in logs:
            json.loads(client.get(key) or b"")  # JSON, every entry
        replayed = optuna.load_study(
            study_name="s", storage=journal_storage(redis_server.url, prefix)
        )
        assert len(replayed.trials) == 120
        assert replayed.best_value == study.best_value
    finally:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


def test_k_fold_selection_scores_each_configuration_over_its_folds(
    client: httpx.Client, labelled_rows: Callable[..., list[dict[str, Any]]]
) -> None:
    """`selection: folds`: each trial is k jobs, fold i of train + validation as validation;
    the trial's value is the mean of their objectives, its spread their standard deviation."""
    import statistics

    def upload(rows: list[dict[str, Any]], name: str) -> str:
        text = "text,sentiment,topic\n" + "".join(
            f"{r['text']},{r['sentiment']},{r['topic']}\n" for r in rows
        )
        r = client.post("/v1/datasets", files={"file": (name, text.encode())})
        assert r.status_code == 201, r.text
        return str(r.json()["source"])

    rows = labelled_rows(120)
    base = base_config(epochs=3)
    base["data"] = {"kind": "files", "train": upload(rows[:90], "tr.csv"),
                    "validation": upload(rows[90:], "va.csv")}  # fmt: skip
    base["tasks"] = [{"name": "sentiment", "labels": ["neg", "neu", "pos"]},
                     {"name": "topic", "labels": ["politics", "sport"]}]  # fmt: skip
    body = study_body(
        base=base,
        search_space=[{"path": "optimizer.lr", "choice": [0.003, 0.005]}],
        selection={"kind": "folds", "folds": 3},
        budget={"trials": 2, "parallel": 2},
        baselines={"single_task": False, "sum": False},
    )
    r = client.post("/v1/studies", json=body)
    assert r.status_code == 202, r.text
    done = wait_study(client, r.json()["id"], TERMINAL)
    assert done["state"] == "succeeded", done
    for trial in done["trials"]:
        assert len(trial["jobs"]) == 3
        folds = [client.get(f"/v1/jobs/{j}/config").json()["data"]["folds"] for j in trial["jobs"]]
        assert [f["index"] for f in folds] == [0, 1, 2] and {f["k"] for f in folds} == {3}
        values = []
        for job_id in trial["jobs"]:
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["state"] == "succeeded"
            values.append(job["final_metrics"]["validation"]["mean"]["macro_f1"])
        assert trial["values"] == pytest.approx(values, abs=1e-6)
        assert trial["value"] == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert trial["spread"] == pytest.approx(statistics.pstdev(values), abs=1e-6)
    bad = study_body(selection={"kind": "folds"})  # dummy data cannot be folded
    r = client.post("/v1/studies", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "selection", "kind"]
