"""End to end: a real redis-server, a real Celery worker process, the API under uvicorn."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import httpx

from tests.service.conftest import DUMMY, long_config, read_sse, submit, wait_for, wait_step


def test_submit_stream_predict_download(client: httpx.Client, tmp_path: Path) -> None:
    job = submit(client, {**DUMMY, "name": "e2e"})
    assert job["state"] == "queued"
    assert job["attempt"] == 1
    assert job["name"] == "e2e"
    assert job["links"]["events"] == f"/v1/jobs/{job['id']}/events"

    events, _ = read_sse(client, job["id"])
    kinds = [e.get("event") for e in events]
    assert kinds[-1] == "end"
    assert events[-1]["data"] == {"state": "succeeded"}
    states = [e["data"]["data"]["state"] for e in events if e.get("event") == "state"]
    assert states == ["queued", "running", "succeeded"]
    ids = [e["id"] for e in events if "id" in e]
    assert len(ids) == len(set(ids)) == len(events) - 1  # every event but `end` has an id

    logs = [e["data"] for e in events if e.get("event") == "log"]
    evals = [e["data"] for e in events if e.get("event") == "evaluate"]
    checkpoints = [e["data"] for e in events if e.get("event") == "checkpoint"]
    assert [entry["step"] for entry in logs] == [5, 10, 15, 20, 25, 30, 32]
    for entry in logs:
        assert entry["attempt"] == 1
        assert set(entry["data"]["tasks"]) == {"task_a", "task_b"}
        for values in entry["data"]["tasks"].values():
            assert values["loss"] > 0 and 0 <= values["accuracy"] <= 1
    splits = [(e["step"], e["data"]["split"]) for e in evals]
    assert splits == [(16, "validation"), (32, "validation")]  # dummy data has no test split
    for entry in evals:
        assert set(entry["data"]["tasks"]) == {"task_a", "task_b"}
        assert "macro_f1" in entry["data"]["tasks"]["task_a"]
    assert [c["step"] for c in checkpoints] == [16, 32]

    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["state"] == "succeeded"
    assert final["progress"]["step"] == final["progress"]["total_steps"] == 32
    assert final["has_model"] is True
    assert final["error"] is None
    for task in ("task_a", "task_b"):
        assert final["latest_metrics"][task]["train"]["step"] == 32
        assert final["latest_metrics"][task]["validation"]["step"] == 32
        assert final["best_metrics"][task]["metric"] == "macro_f1"
    assert set(final["final_metrics"]) == {"validation"}

    # metric history: filters
    history = client.get(f"/v1/jobs/{job['id']}/metrics").json()["items"]
    assert [(m["step"], m["split"]) for m in history if m["type"] == "evaluate"] == splits
    params = {"task": "task_b", "split": "train", "since_step": 20}
    only_b = client.get(f"/v1/jobs/{job['id']}/metrics", params=params).json()["items"]
    assert [m["step"] for m in only_b] == [20, 25, 30, 32]
    assert all(set(m["data"]["tasks"]) == {"task_b"} for m in only_b)

    # predict: per-task label and probabilities
    r = client.post(f"/v1/jobs/{job['id']}/predict", json={"texts": ["hello world", "a b c"]})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 2
    for row in predictions:
        assert set(row) == {"task_a", "task_b"}
        assert len(row["task_a"]["probabilities"]) == 5
        assert abs(sum(row["task_b"]["probabilities"].values()) - 1) < 1e-4
        assert row["task_a"]["label"] in row["task_a"]["probabilities"]

    # the model archive loads with transformers
    r = client.get(f"/v1/jobs/{job['id']}/model")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "model")
    assert model.config.hidden_size == 32
    meta = json.loads((tmp_path / "model" / "mtl.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == ["task_a", "task_b"]
    assert (tmp_path / "model" / "onnx" / "model.onnx").is_file()

    # ?format=onnx: the same model without its PyTorch weights, for ONNX Runtime
    r = client.get(f"/v1/jobs/{job['id']}/model", params={"format": "onnx"})
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"].endswith(f'{job["id"]}-model.onnx.tar.gz"')
    onnx_dir = tmp_path / "onnx-download"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(onnx_dir, filter="data")
    assert "model/onnx/model.onnx" in names and "model/mtl.json" in names
    assert not [n for n in names if n.endswith(".safetensors")], names
    from mtl.ort_predict import load_predictor

    ort = load_predictor(onnx_dir / "model", prefer="onnx")
    for got, want in zip(ort.predict(["hello world", "a b c"]), predictions, strict=True):
        for task in ("task_a", "task_b"):
            assert got[task]["label"] == want[task]["label"]
            for label, p in want[task]["probabilities"].items():
                assert abs(got[task]["probabilities"][label] - p) < 1e-4
    r = client.get(f"/v1/jobs/{job['id']}/model", params={"format": "tflite"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "format"]

    # a stream of a finished job replays and ends at once
    started = time.monotonic()
    replay, _ = read_sse(client, job["id"])
    assert [e.get("id") for e in replay] == [e.get("id") for e in events]
    assert time.monotonic() - started < 5


def test_predict_does_not_wait_behind_training(client: httpx.Client) -> None:
    done = submit(client, DUMMY)
    wait_for(client, done["id"], {"succeeded"})
    busy = submit(client, long_config(steps=5000))
    try:
        assert wait_step(client, busy["id"], 5)["state"] == "running"
        started = time.monotonic()
        r = client.post(f"/v1/jobs/{done['id']}/predict", json={"texts": ["x y z"] * 8})
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 10
        assert client.get(f"/v1/jobs/{busy['id']}").json()["state"] == "running"
        # a job that has not succeeded has no model yet
        r = client.post(f"/v1/jobs/{busy['id']}/predict", json={"texts": ["x"]})
        assert r.status_code == 409
        assert client.get(f"/v1/jobs/{busy['id']}/model").status_code == 409
        r = client.post(f"/v1/jobs/{done['id']}/predict", json={"texts": []})
        assert r.status_code == 422
    finally:
        client.post(f"/v1/jobs/{busy['id']}/cancel")
        wait_for(client, busy["id"], {"cancelled"}, timeout=30)


EXAMPLE_JOB = Path(__file__).resolve().parents[2] / "app" / "examples" / "dummy_job.json"


def test_swagger_example_learns_in_seconds(client: httpx.Client) -> None:
    """The body Swagger UI offers (and the dashboard's first example) visibly learns: the
    exported model's mean validation macro-F1 is high, after seconds of training."""
    config = json.loads(EXAMPLE_JOB.read_text("utf-8"))
    job = submit(client, config)
    final = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
    assert final["state"] == "succeeded", final
    assert final["name"] == config["name"]
    validation = final["final_metrics"]["validation"]
    assert set(validation["tasks"]) == {"task_a", "task_b"}
    assert validation["mean"]["macro_f1"] >= 0.9, validation
    for task, scores in validation["tasks"].items():
        assert scores["macro_f1"] >= 0.8, (task, validation)
    assert final["final_metrics"].get("test") is None  # dummy data has no test split
    wall = final["finished_at"] - final["started_at"]
    assert 0 < wall <= 30, f"the example took {wall:.1f}s from start to finish"
