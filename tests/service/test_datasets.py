"""/v1/datasets, and a job that trains on uploaded data."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import httpx

from tests.service.conftest import DUMMY, read_sse, submit


def _csv(rows: int = 96, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    words = {"pos": ["great", "love", "fine"], "neg": ["awful", "hate", "poor"]}
    topics = {"food": ["pizza", "soup"], "tech": ["laptop", "phone"], "sport": ["goal", "run"]}
    lines = ["text,sentiment,topic"]
    for _ in range(rows):
        s = rng.choice(list(words))
        t = rng.choice(list(topics))
        text = f"{rng.choice(words[s])} {rng.choice(topics[t])} {rng.choice(words[s])}"
        lines.append(f'"{text}",{s},{t}')
    return ("\n".join(lines) + "\n").encode()


def _upload(client: httpx.Client, content: bytes, filename: str, **form: str) -> httpx.Response:
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=form)


def test_upload_inspect_list_delete(
    client: httpx.Client, bob: httpx.Client, service_env: dict[str, str]
) -> None:
    r = _upload(client, _csv(), "reviews.csv", name="reviews")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["source"] == f"dataset:{ds['id']}"
    assert ds["rows"] == 96
    assert ds["columns"] == ["text", "sentiment", "topic"]
    assert ds["label_values"]["sentiment"] == ["neg", "pos"]
    assert ds["label_values"]["topic"] == ["food", "sport", "tech"]
    assert ds["format"] == "csv" and ds["name"] == "reviews" and ds["filename"] == "reviews.csv"

    jsonl = "\n".join(json.dumps({"text": f"t{i}", "y": i % 2}) for i in range(10)).encode()
    r2 = _upload(client, jsonl, "data.jsonl")
    assert r2.status_code == 201, r2.text
    assert r2.json()["label_values"]["y"] == ["0", "1"]

    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds
    listed = client.get("/v1/datasets").json()
    assert [d["id"] for d in listed["items"]][:2] == [r2.json()["id"], ds["id"]]

    # another key: 404, as for an unknown id
    assert bob.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert bob.delete(f"/v1/datasets/{ds['id']}").status_code == 404
    assert ds["id"] not in {d["id"] for d in bob.get("/v1/datasets").json()["items"]}
    # and bob cannot train on it either
    cfg = copy.deepcopy(DUMMY)
    cfg["data"] = {"kind": "files", "train": ds["source"]}
    r = bob.post("/v1/jobs", json=cfg)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "data", "train"]

    folder = Path(service_env["MTL_DATA_DIR"]) / "datasets" / ds["id"]
    assert (folder / "data.csv").is_file()
    assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert client.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert not folder.exists()


def test_upload_limits_and_errors(client: httpx.Client, service_env: dict[str, str]) -> None:
    cap = int(service_env["MTL_MAX_UPLOAD_BYTES"])
    big = b"text,label\n" + b"".join(b'"%d",a\n' % i for i in range(cap // 5))
    assert len(big) > cap
    r = _upload(client, big, "big.csv")
    assert r.status_code == 413
    # just over the cap: the request body passes the transport limit, the file check catches it
    r = _upload(client, b"text,label\n" + b"x" * cap, "edge.csv")
    assert r.status_code == 413
    assert "cap" in r.json()["detail"]
    datasets_dir = Path(service_env["MTL_DATA_DIR"]) / "datasets"
    before = set(datasets_dir.iterdir()) if datasets_dir.exists() else set()

    r = _upload(client, b'text,label\n"a",x\n"b",y,extra\n', "bad.csv")
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "file"]
    assert "row 2" in detail["msg"]

    r = _upload(client, b"{}", "notes.txt")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "file"]
    assert (set(datasets_dir.iterdir()) if datasets_dir.exists() else set()) == before


def test_job_on_uploaded_data(client: httpx.Client) -> None:
    train = _upload(client, _csv(128, seed=1), "train.csv").json()
    valid = _upload(client, _csv(32, seed=2), "valid.csv").json()
    cfg = copy.deepcopy(DUMMY)
    cfg["tasks"] = [
        {"name": "sentiment", "labels": ["neg", "pos"]},
        {"name": "topic", "labels": ["food", "sport", "tech"]},
    ]
    cfg["data"] = {"kind": "files", "train": train["source"], "validation": valid["source"]}
    cfg["epochs"] = 1

    # the datasets are checked before queueing: a label column that does not exist is a 422
    wrong = copy.deepcopy(cfg)
    wrong["tasks"][1]["label_column"] = "category"
    r = client.post("/v1/jobs", json=wrong)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "data", "train"]
    assert "category" in r.json()["detail"][0]["msg"]

    job = submit(client, cfg)
    events, _ = read_sse(client, job["id"])
    assert events[-1]["data"] == {"state": "succeeded"}, events[-3:]
    r = client.post(f"/v1/jobs/{job['id']}/predict", json={"texts": ["love pizza", "hate phone"]})
    assert r.status_code == 200, r.text
    for row in r.json()["predictions"]:
        assert row["sentiment"]["label"] in ("neg", "pos")
        assert set(row["topic"]["probabilities"]) == {"food", "sport", "tech"}
