"""Prediction throughput: the library's engines, then the API with and without batching.

    python benchmarks/predict_throughput.py [--quick] [--repeats 3] [--texts 256] [--seconds 8]
                                            [--text reviews|sentences|both]

A real MiniLM two-task model, made the service's way: a private stack on loopback (a
redis-server, one Celery worker, the API under uvicorn), a stratified subsample of
../shared/data/womens_clothing_reviews uploaded through `POST /v1/datasets`, and
`examples/womens_clothing.yaml` (the bundled all-MiniLM-L6-v2, mean pooling, max length 128)
trained as a job for `--steps` steps with `onnx: {export: true, int8: true}`; the model is
downloaded through `GET /v1/jobs/{id}/model`. The texts come from the data set's test split
(never trained on), in two shapes (`--text`, default both, each measured in full): whole
reviews (~60 words: compute-bound, padding costs) and the reviews' sentences (~12 words).

1. The library, in this process, interleaved (each repeat runs every engine in turn, the order
   rotated) and repeated: texts/s at batch 1 (one `predict([text])` per text) and batch 32 of
   PyTorch (`mtl.predict.Predictor`), ONNX Runtime fp32 and ONNX Runtime int8
   (`mtl.ort_predict.OrtPredictor`), with `--threads` threads each; and how often the int8
   graph's argmax agrees with fp32's (and fp32's with PyTorch's), per task.
2. The API: two API processes on the same Redis and data, one with batching off
   (`MTL_PREDICT_MAX_BATCH=1`: each call runs alone, as before batching) and one with it on
   (`MTL_PREDICT_BATCH_WAIT_MS` / `MTL_PREDICT_MAX_BATCH` from `--wait-ms` / `--max-batch`);
   1, 8 and 32 closed-loop clients (bare keep-alive HTTP/1.1 clients on asyncio, so the
   harness costs little CPU), each sending single-text `POST /v1/jobs/{id}/predict` calls for
   `--seconds`: texts/s, p50 / p99 latency, and the API's mean batch (its
   `mtl_predict_batch_texts` metric). Interleaved and repeated like 1. The API serves the int8
   graph (ONNX Runtime, its default threads).

Ratios (per repeat, then min / median / max): ONNX int8 at batch 32 vs PyTorch at batch 32
[target >= 2.5], the API with batching at 32 clients vs the API without batching at 1 client
(today's single-text throughput) [target >= 4].

Writes benchmarks/results/predict_throughput.json and .log (`--quick`: a smoke run with few
texts, steps and repeats, written as predict_throughput_quick.*). Records the CPU model, the
load average before and after, and the library versions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gc
import io
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.study_clothing import subsample as study_subsample  # noqa: E402
from service.embedded import RedisServer, free_port, start_worker, stop_process  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "womens_clothing_reviews"
EXAMPLE = ROOT / "examples" / "womens_clothing.yaml"
RESULTS = ROOT / "benchmarks" / "results"
PREFIX = "predbench"
ENGINES = ("pytorch", "onnx_fp32", "onnx_int8")
CLIENTS = (1, 8, 32)

_LOG: Any = None


def say(line: str = "") -> None:
    print(line, flush=True)
    if _LOG is not None:
        _LOG.write(line + "\n")
        _LOG.flush()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: list[float], digits: int = 1) -> dict[str, Any]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
        "each": [round(v, digits) for v in values],
    }


def show(s: dict[str, Any]) -> str:
    return f"{s['median']} ({s['min']}-{s['max']})"


# ---------------------------------------------------------------------------- the data


def read_rows(split: str) -> list[dict[str, str]]:
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def subsample(split: str, n: int, seed: int) -> bytes:
    """`n` rows of `split` (at most all), stratified and drawn as benchmarks/study_clothing.py
    draws them, as CSV bytes."""
    return study_subsample(split, min(n, len(read_rows(split))), seed)[0]


def bench_texts(n: int, seed: int, shape: str) -> list[str]:
    """`n` texts of the test split in a seeded random order: whole reviews, or the reviews'
    sentences of at least 3 words (what a sentence encoder is usually asked about)."""
    reviews = [r["text"].strip() for r in read_rows("test") if r["text"].strip()]
    if shape == "sentences":
        reviews = [s for r in reviews for s in re.split(r"(?<=[.!?])\s+", r) if len(s.split()) >= 3]
    random.Random(seed).shuffle(reviews)
    return reviews[:n]


# ---------------------------------------------------------------------------- the stack


class Stack:
    """A private redis-server, one worker, and API processes with their own settings."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", password="bench-pass")
        self.worker: subprocess.Popen[bytes] | None = None
        self.apis: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        self.env: dict[str, str] = {}

    def start(self, torch_threads: int) -> None:
        import redis

        self.redis.start()
        self.env = {
            "MTL_REDIS_URL": self.redis.url,
            "MTL_DATA_DIR": str(self.workdir / "data"),
            "MTL_KEY_PREFIX": PREFIX,
            "MTL_QUEUE_NAME": PREFIX,
            "MTL_TORCH_THREADS": str(torch_threads),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
        }
        self.worker = start_worker(
            self.env, queue=PREFIX, log_file=self.workdir / "worker.log", name="pred@%h"
        )
        client = redis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + 120
        try:
            while not client.zcard(f"{PREFIX}:workers"):
                if time.monotonic() > deadline or self.worker.poll() is not None:
                    raise RuntimeError(f"the worker did not start; see {self.workdir}/worker.log")
                time.sleep(0.2)
        finally:
            client.close()

    def start_api(self, name: str, settings: dict[str, str]) -> str:
        import httpx

        port = free_port()
        env = {**os.environ, **self.env, **settings, "PYTHONPATH": str(ROOT)}
        with open(self.workdir / f"api-{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                 "--no-access-log"],
                env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.apis[name] = (proc, port)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the API {name} did not start; see {self.workdir}/api-{name}.log"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        for proc, _ in self.apis.values():
            stop_process(proc, sig=signal.SIGTERM)
        if self.worker is not None:
            stop_process(self.worker, sig=signal.SIGQUIT)
        self.redis.stop()


def train_model(url: str, args: argparse.Namespace, target: Path) -> dict[str, Any]:
    """Upload the subsample, train the README config for `args.steps` steps with the ONNX
    fp32 and int8 exports, download the model into `target`. Returns the job's facts."""
    import httpx
    import yaml

    client = httpx.Client(base_url=url, timeout=120)
    sources = {}
    for split, n in (("train", args.train_rows), ("validation", args.val_rows)):
        r = client.post(
            "/v1/datasets",
            files={"file": (f"{split}.csv", subsample(split, n, args.seed), "text/csv")},
            data={"name": f"womens clothing {split} ({n} rows)"},
        )
        r.raise_for_status()
        sources[split] = r.json()["source"]
    config = yaml.safe_load(EXAMPLE.read_text())
    config["data"].update(train=sources["train"], validation=sources["validation"])
    config["data"].pop("test", None)
    config.update(
        name="predict throughput model",
        max_steps=args.steps,
        epochs=1,
        log_every=max(1, args.steps // 4),
        grad_conflict_every=0,
        onnx={"export": True, "int8": True},
    )
    started = time.monotonic()
    r = client.post("/v1/jobs", json=config)
    r.raise_for_status()
    job_id = r.json()["id"]
    deadline = time.monotonic() + 3600
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['state']}")
        time.sleep(1)
    if job["state"] != "succeeded":
        raise RuntimeError(f"the model's job {job['state']}: {job.get('error')}")
    r = client.get(f"/v1/jobs/{job_id}/model")
    r.raise_for_status()
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(target, filter="data")
    client.close()
    meta = json.loads((target / "model" / "mtl.json").read_text())
    validation = (job.get("final_metrics") or {}).get("validation") or {}
    return {
        "job": job_id,
        "steps": args.steps,
        "train_rows": args.train_rows,
        "wall_s": round(time.monotonic() - started, 1),
        "onnx": meta.get("onnx"),
        "validation_macro_f1": {
            t: round(v.get("macro_f1", 0.0), 3) for t, v in (validation.get("tasks") or {}).items()
        },
    }


# ---------------------------------------------------------------------------- 1. library


def bench_library(
    model_dir: Path, texts: list[str], repeats: int, threads: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from mtl.ort_predict import OrtPredictor
    from mtl.predict import Predictor

    torch.set_num_threads(threads)
    engines: dict[str, Any] = {
        "pytorch": Predictor.load(model_dir),
        "onnx_fp32": OrtPredictor.load(model_dir, int8=False, intra_op_threads=threads),
        "onnx_int8": OrtPredictor.load(model_dir, int8=True, intra_op_threads=threads),
    }
    outputs = {name: engine.predict(texts) for name, engine in engines.items()}  # warm-up too

    def agreement(a: str, b: str) -> dict[str, float]:
        tasks = list(outputs[a][0])
        return {
            t: round(
                sum(
                    x[t]["label"] == y[t]["label"]
                    for x, y in zip(outputs[a], outputs[b], strict=True)
                )
                / len(texts),
                4,
            )
            for t in tasks
        }

    agree = {"int8_vs_fp32": agreement("onnx_int8", "onnx_fp32")}
    agree["fp32_vs_pytorch"] = agreement("onnx_fp32", "pytorch")
    rates: dict[str, dict[int, list[float]]] = {n: {1: [], 32: []} for n in engines}
    for rep in range(repeats):
        order = list(ENGINES[rep % 3 :] + ENGINES[: rep % 3])
        for batch in (1, 32):
            for name in order:
                engine = engines[name]
                started = time.perf_counter()
                for i in range(0, len(texts), batch):
                    engine.predict(texts[i : i + batch], batch_size=batch)
                rates[name][batch].append(len(texts) / (time.perf_counter() - started))
            say(
                f"  repeat {rep + 1}, batch {batch:2}: "
                + ", ".join(f"{n} {rates[n][batch][-1]:.1f}" for n in ENGINES)
                + " texts/s"
            )
    table = {n: {f"batch_{b}": spread(v) for b, v in per.items()} for n, per in rates.items()}
    ratio = [i8 / pt for i8, pt in zip(rates["onnx_int8"][32], rates["pytorch"][32], strict=True)]
    table["ratio_int8_b32_vs_pytorch_b32"] = spread(ratio, 2)
    return table, agree


# ---------------------------------------------------------------------------- 2. the API


class RawClient:
    """A bare keep-alive HTTP/1.1 client on asyncio streams (as benchmarks/api_load.py)."""

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    async def post_json(self, path: str, body: bytes) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        return status, await self.reader.readexactly(length)


def batch_metric(url: str) -> tuple[float, float]:
    """(model runs, texts) of predict so far in one API process (its /metrics)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = [
        re.search(rf"^mtl_predict_batch_texts_{k} ([0-9.e+]+)$", text, re.M)
        for k in ("count", "sum")
    ]
    return tuple(float(m.group(1)) if m else float("nan") for m in found)  # type: ignore[return-value]


async def closed_loop(
    url: str, path: str, bodies: list[bytes], clients: int, seconds: float
) -> dict[str, Any]:
    """`clients` clients, each sending one call at a time for `seconds` (after 2 warm-up calls
    each); latencies of the calls that ended within the window."""
    latencies: list[float] = []
    errors = ready = 0
    all_ready, start = asyncio.Event(), asyncio.Event()
    end = [0.0]

    async def one(i: int) -> None:
        nonlocal errors, ready
        k = i
        async with RawClient(url) as client:
            for _ in range(2):
                await client.post_json(path, bodies[k % len(bodies)])
                k += clients
            ready += 1
            if ready == clients:
                all_ready.set()
            await start.wait()
            while True:
                began = time.perf_counter()
                if began >= end[0]:
                    return
                status, _ = await client.post_json(path, bodies[k % len(bodies)])
                done = time.perf_counter()
                k += clients
                if status != 200:
                    errors += 1
                elif done <= end[0]:
                    latencies.append((done - began) * 1000)

    tasks = [asyncio.create_task(one(i)) for i in range(clients)]
    await asyncio.wait_for(all_ready.wait(), 300)  # every client connected and warmed up
    end[0] = time.perf_counter() + seconds
    start.set()
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 300)
    return {
        "texts_per_s": len(latencies) / seconds,
        "p50_ms": pct(latencies, 0.5),
        "p99_ms": pct(latencies, 0.99),
        "calls": len(latencies),
        "errors": errors,
    }


def bench_api(
    urls: dict[str, str], job_id: str, texts: list[str], repeats: int, seconds: float
) -> dict[str, Any]:
    path = f"/v1/jobs/{job_id}/predict"
    bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {v: {c: [] for c in CLIENTS} for v in urls}
    variants = list(urls)
    for rep in range(repeats):
        for clients in CLIENTS:
            order = variants if rep % 2 == 0 else variants[::-1]
            for variant in order:
                url = urls[variant]
                before = batch_metric(url)
                result = asyncio.run(closed_loop(url, path, bodies, clients, seconds))
                after = batch_metric(url)
                model_runs = after[0] - before[0]
                result["mean_batch"] = (after[1] - before[1]) / model_runs if model_runs else None
                runs[variant][clients].append(result)
                say(
                    f"  repeat {rep + 1}, {clients:2} clients, batching {variant:3}: "
                    f"{result['texts_per_s']:.1f} texts/s, p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms, mean batch "
                    f"{result['mean_batch'] or 0:.1f}, errors {result['errors']}"
                )
    table: dict[str, Any] = {}
    for variant, per in runs.items():
        table[variant] = {
            f"clients_{c}": {
                "texts_per_s": spread([r["texts_per_s"] for r in rs]),
                "p50_ms": spread([r["p50_ms"] for r in rs]),
                "p99_ms": spread([r["p99_ms"] for r in rs]),
                "mean_batch": spread([r["mean_batch"] or 0.0 for r in rs]),
                "errors": sum(r["errors"] for r in rs),
            }
            for c, rs in per.items()
        }
    on, off = runs["on"], runs["off"]

    def ratios(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
        return spread(
            [
                x["texts_per_s"] / y["texts_per_s"] if y["texts_per_s"] else float("nan")
                for x, y in zip(a, b, strict=True)
            ],
            2,
        )

    table["ratio_on_32_vs_off_1"] = ratios(on[32], off[1])
    table["ratio_on_32_vs_off_32"] = ratios(on[32], off[32])
    table["ratio_on_1_vs_off_1"] = ratios(on[1], off[1])
    return table


# ---------------------------------------------------------------------------- main


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "onnxruntime", "transformers"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            out[name] = "missing"
    return out


def main() -> None:
    global _LOG
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few texts, repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=256, help="texts per library measurement")
    parser.add_argument("--seconds", type=float, default=8.0, help="per API measurement")
    parser.add_argument("--steps", type=int, default=20, help="training steps of the model")
    parser.add_argument("--train-rows", type=int, default=640)
    parser.add_argument("--val-rows", type=int, default=200)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--wait-ms", type=float, default=5.0, help="the API's batch wait (on)")
    parser.add_argument("--max-batch", type=int, default=64, help="the API's batch size (on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--text", choices=["reviews", "sentences", "both"], default="both", help="text shape"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.texts, args.seconds = 1, 32, 3.0
        args.steps, args.train_rows, args.val_rows = 2, 64, 32
    name = "predict_throughput_quick" if args.quick else "predict_throughput"
    RESULTS.mkdir(parents=True, exist_ok=True)
    _LOG = open(RESULTS / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    machine = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        **versions(),
    }
    say(f"predict throughput{' (quick smoke run)' if args.quick else ''}, {time.ctime()}")
    say(
        f"machine: {machine['cpu']}, {machine['cpus']} CPUs, load {machine['load_before']}, "
        f"Python {machine['python']}, torch {machine['torch']}, onnxruntime "
        f"{machine['onnxruntime']}"
    )
    results: dict[str, Any] = {"machine": machine, "args": vars(args)}
    workdir = Path(tempfile.mkdtemp(prefix="mtl-predict-bench-"))
    stack = Stack(workdir)
    shapes = ["reviews", "sentences"] if args.text == "both" else [args.text]
    try:
        stack.start(torch_threads=args.threads)
        on_settings = {
            "MTL_PREDICT_BATCH_WAIT_MS": str(args.wait_ms),
            "MTL_PREDICT_MAX_BATCH": str(args.max_batch),
        }
        urls = {"off": stack.start_api("off", {"MTL_PREDICT_MAX_BATCH": "1"})}
        urls["on"] = stack.start_api("on", on_settings)
        say(f"stack: redis, 1 worker, APIs (batching off / on: {on_settings}) in {workdir}")

        say(f"model: examples/womens_clothing.yaml, {args.steps} steps on {args.train_rows} rows")
        model = train_model(urls["on"], args, workdir / "download")
        results["model"] = model
        say(f"  job {model['job']}: {model['wall_s']} s, validation macro-F1 "
            f"{model['validation_macro_f1']}, onnx {model['onnx']}")  # fmt: skip
        model_dir = workdir / "download" / "model"
        gc.collect()
        gc.freeze()

        for shape in shapes:
            texts = bench_texts(max(args.texts, 256), args.seed, shape)
            words = statistics.mean(len(t.split()) for t in texts)
            say(f"== {shape}: mean {words:.1f} words")
            say(f"1. library: {args.texts} {shape}, batch 1 and 32, {args.threads} threads")
            library, agree = bench_library(
                model_dir, texts[: args.texts], args.repeats, args.threads
            )
            say(f"  argmax agreement: {agree}")
            say(f"2. API: single-text calls, {CLIENTS} clients, {args.seconds} s each")
            api = bench_api(urls, model["job"], texts, args.repeats, args.seconds)
            results[shape] = {
                "mean_words": round(words, 1),
                "library": library,
                "argmax_agreement": agree,
                "api": api,
            }
    finally:
        stack.stop()
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]

    results["targets"] = {}
    for shape in shapes:
        lib, api = results[shape]["library"], results[shape]["api"]
        say("")
        say(f"## {shape} (mean {results[shape]['mean_words']} words)")
        say("")
        say("| engine | batch 1 texts/s | batch 32 texts/s |")
        say("| --- | --- | --- |")
        for engine in ENGINES:
            say(f"| {engine} | {show(lib[engine]['batch_1'])} | {show(lib[engine]['batch_32'])} |")
        say("")
        say("| API clients | batching | texts/s | p50 ms | p99 ms | mean batch |")
        say("| --- | --- | --- | --- | --- | --- |")
        for clients in CLIENTS:
            for variant in ("off", "on"):
                row = api[variant][f"clients_{clients}"]
                say(
                    f"| {clients} | {variant} | {show(row['texts_per_s'])} "
                    f"| {show(row['p50_ms'])} | {show(row['p99_ms'])} | {show(row['mean_batch'])} |"
                )
        say("")
        targets = {
            "ONNX int8 batch 32 vs PyTorch batch 32 >= 2.5": (
                lib["ratio_int8_b32_vs_pytorch_b32"],
                2.5,
            ),
            "API 32 clients (batching) vs 1 client (no batching) >= 4": (
                api["ratio_on_32_vs_off_1"],
                4.0,
            ),
        }
        for label, (ratio, limit) in targets.items():
            verdict = "PASS" if ratio["median"] >= limit else "MISS"
            say(f"{verdict}  {shape}: {label}: {show(ratio)}")
            results["targets"][f"{shape}: {label}"] = ratio["median"] >= limit
        say(f"      API 32 clients, batching on vs off: {show(api['ratio_on_32_vs_off_32'])}")
        say(f"      API 1 client, batching on vs off: {show(api['ratio_on_1_vs_off_1'])}")
        say(f"      int8 vs fp32 argmax agreement: {results[shape]['argmax_agreement']}")
    say(f"load average after: {machine['load_after']}")
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    say(f"written: benchmarks/results/{name}.json and .log")
    _LOG.close()


if __name__ == "__main__":
    main()
