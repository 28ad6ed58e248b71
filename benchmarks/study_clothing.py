"""A study on real data, end to end: the README's clothing-reviews config against a search.

    python benchmarks/study_clothing.py [--train-rows 1000 --val-rows 400 --test-rows 600]

Starts its own stack on loopback (a private redis-server, one Celery worker with
`MTL_TORCH_THREADS=2`, the API under uvicorn), uploads a stratified subsample of
../shared/data/womens_clothing_reviews through `POST /v1/datasets`, then

(a) trains `examples/womens_clothing.yaml` as one ordinary job: same hyperparameters, the data
    pointed at the uploaded `dataset:<id>` sources, `encoder.max_length` set by `--max-length`
    (the only change besides the data; `--epochs` would be a second one, and says so);
(b) runs a study whose base config is that same job body: `--trials` trials one at a time
    (`parallel: 1`), TPE, median pruning, baselines on (each task alone, plain `sum`).

It prints, and writes to `benchmarks/results/study_clothing.json` and `.log`: the machine, the
subsample, the README config's validation objective (mean macro-F1 over the two tasks, the
study's objective) and test scores, the study's best trial, whether it beats the README
config on validation, the leaderboard, the importances, the verdict, the wall time, and the
scheduling overhead per trial: for consecutive search trials (one idle worker, parallel 1),
the time from a trial job's `finished_at` to its successor's `started_at`, min/median/max
(target: at most 1 s), split into where it goes: the job records' `created_at`, the
study's own "finished" event, the worker log's "received" line, and the life of each training
process of the worker (forked, exited, reaped: /proc, polled every 20 ms). Also the driver's
poll latency (a validation evaluation written -> reported to the pruner).

The subsample is drawn like the data set's own split: stratified on department x sentiment
with `random.Random(--seed)`, largest-remainder rounding. It is written to a temporary folder
and uploaded from there, never into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.embedded import RedisServer, free_port, start_worker, stop_process  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "womens_clothing_reviews"
EXAMPLE = ROOT / "examples" / "womens_clothing.yaml"
RESULTS = ROOT / "benchmarks" / "results"
PREFIX = "studybench"
TERMINAL_JOB = {"succeeded", "failed", "cancelled"}
TERMINAL_STUDY = {"succeeded", "failed", "cancelled"}

SEARCH_SPACE: list[dict[str, Any]] = [
    {"path": "optimizer.lr", "float": {"low": 3e-4, "high": 3e-3, "log": True}},
    {"path": "optimizer.encoder_lr", "float": {"low": 2e-5, "high": 2e-4, "log": True}},
    {"path": "epochs", "int": {"low": 2, "high": 4}},
    {"path": "weighting.name", "choice": ["sum", "uncertainty", "dwa", "famo"]},
    {"path": "tasks.sentiment.class_weights", "choice": [None, "balanced"]},
    {"path": "gradient.name", "choice": ["none", "pcgrad", "upgrad"]},
]

_LOG: Any = None
LOAD: list[float] = []  # the 1-minute load average, sampled while waiting


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


# ---------------------------------------------------------------------------- the data


def subsample(split: str, n: int, seed: int) -> tuple[bytes, dict[str, dict[str, int]]]:
    """`n` rows of `split`, stratified on department x sentiment (largest remainder), sorted
    by id, as CSV bytes (text, department, sentiment), with the class counts."""
    with open(DATA / f"{split}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if n > len(rows):
        raise SystemExit(f"{split}.csv has {len(rows)} rows, fewer than {n}")
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[(row["department"], row["sentiment"])].append(row)
    quota = {k: n * len(v) / len(rows) for k, v in groups.items()}
    take = {k: int(q) for k, q in quota.items()}
    for k in sorted(quota, key=lambda k: (-(quota[k] - take[k]), k))[: n - sum(take.values())]:
        take[k] += 1
    rng = random.Random(f"{seed}:{split}")
    picked: list[dict[str, str]] = []
    for k in sorted(groups):
        group = list(groups[k])
        rng.shuffle(group)
        picked += group[: take[k]]
    picked.sort(key=lambda r: int(r["id"]))
    out = io.StringIO()
    writer = csv.DictWriter(
        out,
        fieldnames=["text", "department", "sentiment"],
        extrasaction="ignore",
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(picked)
    counts: dict[str, dict[str, int]] = {"department": {}, "sentiment": {}}
    for row in picked:
        for col in counts:
            counts[col][row[col]] = counts[col].get(row[col], 0) + 1
    return out.getvalue().encode(), {c: dict(sorted(v.items())) for c, v in counts.items()}


# ---------------------------------------------------------------------------- the stack


class ChildWatch(threading.Thread):
    """The worker's pool processes: when each was forked (from /proc/<pid>/stat, 10 ms
    resolution), first seen exited (a zombie) and reaped (gone), polled every `interval`."""

    def __init__(self, parent: int, interval: float = 0.02) -> None:
        super().__init__(name="child-watch", daemon=True)
        self.parent = parent
        self.interval = interval
        self.children: dict[int, dict[str, float | None]] = {}
        self._halt = threading.Event()
        self._hz = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _stat(pid: int) -> list[str] | None:
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return raw[raw.rindex(")") + 2 :].split()  # fields from the state on

    def _pids(self) -> set[int]:
        pids: set[int] = set()
        try:
            tasks = os.listdir(f"/proc/{self.parent}/task")
        except OSError:
            return pids
        for tid in tasks:
            with contextlib.suppress(OSError, ValueError):
                text = Path(f"/proc/{self.parent}/task/{tid}/children").read_text()
                pids.update(int(p) for p in text.split())
        return pids

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            now = time.time()
            boot = now - time.clock_gettime(time.CLOCK_BOOTTIME)
            pids = self._pids()
            for pid in pids:
                info = self.children.get(pid)
                fields = self._stat(pid)
                if info is None:
                    if fields is None:
                        continue
                    forked = boot + int(fields[19]) / self._hz
                    info = self.children[pid] = {"forked": forked, "zombie": None, "gone": None}
                if info["zombie"] is None and fields is not None and fields[0] in ("Z", "X"):
                    info["zombie"] = now
            for pid, info in self.children.items():
                if pid not in pids and info["gone"] is None:
                    info["gone"] = now
                    if info["zombie"] is None:
                        info["zombie"] = now

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


class Stack:
    """A private redis-server, one worker (`MTL_TORCH_THREADS`), the API under uvicorn."""

    def __init__(self, workdir: Path, torch_threads: int) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", password="bench-pass")
        self.port = free_port()
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.torch_threads = torch_threads
        self.env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import httpx
        import redis

        self.redis.start()
        self.env = {
            "MTL_REDIS_URL": self.redis.url,
            "MTL_DATA_DIR": str(self.workdir / "data"),
            "MTL_KEY_PREFIX": PREFIX,
            "MTL_QUEUE_NAME": PREFIX,
            "MTL_TORCH_THREADS": str(self.torch_threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        with open(self.workdir / "api.log", "ab") as log:
            self.api = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--factory",
                    "app.main:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                env=env,
                cwd=str(ROOT),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.worker = start_worker(
            self.env, queue=PREFIX, log_file=self.workdir / "worker.log", name="study@%h"
        )
        deadline = time.monotonic() + 120
        client = redis.Redis.from_url(self.redis.url)
        try:
            api_up = worker_up = False
            while time.monotonic() < deadline and not (api_up and worker_up):
                worker_up = worker_up or bool(client.zcard(f"{PREFIX}:workers"))
                with contextlib.suppress(httpx.TransportError):
                    api_up = api_up or httpx.get(f"{self.url}/healthz", timeout=1).is_success
                time.sleep(0.2)
        finally:
            client.close()
        if not (api_up and worker_up):
            raise RuntimeError(f"the stack did not start; see {self.workdir}/api.log, worker.log")

    def job_record(self, job_id: str) -> dict[str, str]:
        import redis

        client: Any = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            return dict(client.hgetall(f"{PREFIX}:job:{job_id}"))
        finally:
            client.close()

    def metric_events(self, job_id: str) -> list[dict[str, Any]]:
        import redis

        client: Any = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            return [json.loads(m) for m in client.zrange(f"{PREFIX}:job:{job_id}:metrics", 0, -1)]
        finally:
            client.close()

    def study_events(self, study_id: str) -> list[dict[str, Any]]:
        import redis

        client: Any = redis.Redis.from_url(self.redis.url, decode_responses=True)
        try:
            entries = client.xrange(f"{PREFIX}:study:{study_id}:events")
        finally:
            client.close()
        return [json.loads(fields["e"]) for _, fields in entries]

    def stop(self) -> None:
        for proc, sig in ((self.worker, signal.SIGQUIT), (self.api, signal.SIGTERM)):
            if proc is not None:
                stop_process(proc, sig=sig)
        self.redis.stop()


# ---------------------------------------------------------------------------- helpers


def wait_job(client: Any, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = None
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        LOAD.append(os.getloadavg()[0])
        progress = job.get("progress") or {}
        line = (
            f"  job {job_id}: {job['state']} step {progress.get('step')}/"
            f"{progress.get('total_steps')}"
        )
        if job["state"] in TERMINAL_JOB:
            return job
        if line != last and int(time.monotonic()) % 30 < 3:
            say(line)
            last = line
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
        time.sleep(2)


def scores(final: dict[str, Any] | None, split: str) -> dict[str, Any]:
    """Per task accuracy and macro-F1, and the mean macro-F1, of one split of a job's
    `final_metrics`."""
    report = (final or {}).get(split) or {}
    out: dict[str, Any] = {
        task: {"accuracy": v.get("accuracy"), "macro_f1": v.get("macro_f1")}
        for task, v in (report.get("tasks") or {}).items()
    }
    tasks = [v["macro_f1"] for v in out.values() if v.get("macro_f1") is not None]
    out["mean_macro_f1"] = sum(tasks) / len(tasks) if tasks else None
    return out


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def short_params(params: dict[str, Any]) -> str:
    parts = []
    for key, value in params.items():
        name = key.replace("optimizer.", "").replace("tasks.sentiment.", "sent.")
        if isinstance(value, float):
            parts.append(f"{name}={value:.2e}")
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


_RECEIVED = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] Task mtl\.run_job\[[^\]]+\] "
    r"received"
)


def received_times(worker_log: Path) -> list[float]:
    """When the worker's main process took each message ("Task ... received"), in order."""
    out = []
    for line in worker_log.read_text(errors="replace").splitlines():
        m = _RECEIVED.match(line)
        if m:
            out.append(datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return out


def child_times(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float | None]:
    """Where the worker's share of a gap goes: the previous pool process ending after its job
    finished, the replacement being forked, and the new process beginning its job."""

    def diff(later: float | None, earlier: float | None) -> float | None:
        return None if later is None or earlier is None else later - earlier

    return {
        "finished_to_exit_s": diff(a.get("exited_at"), a.get("finished_at")),
        "exit_to_reaped_s": diff(a.get("reaped_at"), a.get("exited_at")),
        "exit_to_fork_s": diff(b.get("forked_at"), a.get("exited_at")),
        "fork_to_started_s": diff(b.get("started_at"), b.get("forked_at")),
    }


def stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "min": None, "median": None, "max": None}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def scheduling(
    stack: Stack, watch: ChildWatch, jobs_in_order: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every job the worker ran, in start order, with its record's times, the worker log's
    "received" time (the n-th received line is the n-th started job: one worker, one slot)
    and the life of the pool process that ran it (its pid is in the attempt's token)."""
    received = received_times(stack.workdir / "worker.log")
    rows = []
    for k, job in enumerate(sorted(jobs_in_order, key=lambda j: float(j["started_at"]))):
        rec = stack.job_record(job["id"])
        pid = None
        with contextlib.suppress(IndexError, ValueError):
            pid = int(str(rec.get("worker", "")).split(":")[1])
        child = watch.children.get(pid, {}) if pid is not None else {}
        rows.append(
            {
                "job": job["id"],
                "what": job["what"],
                "state": rec.get("state"),
                "created_at": float(rec["created_at"]),
                "queued_at": float(rec["queued_at"]) if rec.get("queued_at") else None,
                "received_at": received[k] if k < len(received) else None,
                "started_at": float(rec["started_at"]),
                "finished_at": float(rec["finished_at"]) if rec.get("finished_at") else None,
                "cancel_requested_at": float(rec["cancel_requested_at"])
                if rec.get("cancel_requested_at")
                else None,
                "pid": pid,
                "forked_at": child.get("forked"),
                "exited_at": child.get("zombie"),
                "reaped_at": child.get("gone"),
            }
        )
    if len(received) != len(rows):
        say(f"note: {len(received)} 'received' lines in the worker log for {len(rows)} jobs")
    return rows


# ---------------------------------------------------------------------------- main


def main() -> None:
    global _LOG
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--val-rows", type=int, default=400)
    parser.add_argument("--test-rows", type=int, default=600)
    parser.add_argument("--max-length", type=int, default=64, help="encoder.max_length")
    parser.add_argument("--epochs", type=int, default=None, help="override the README's 4")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="subsample and sampler seed")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "study_clothing.json")
    parser.add_argument("--log", type=Path, default=None, help="default: the --json with .log")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args()
    log_path = args.log or args.json.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    _LOG = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed at the end)

    import httpx
    import torch
    import yaml

    t_start = time.time()
    machine = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_threads": args.torch_threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    say(f"# study benchmark on real data ({datetime.now().isoformat(timespec='seconds')})")
    say(
        f"machine: {machine['cpu']}, {machine['cpus']} CPUs, MTL_TORCH_THREADS="
        f"{args.torch_threads}, Python {machine['python']}, torch {machine['torch']}"
    )

    results: dict[str, Any] = {
        "machine": machine,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    workdir = Path(tempfile.mkdtemp(prefix="mtl-study-bench-"))
    stack = Stack(workdir, args.torch_threads)
    try:
        stack.start()
        assert stack.worker is not None
        watch = ChildWatch(stack.worker.pid)
        watch.start()
        say(f"stack: redis, 1 worker, API at {stack.url} (work folder {workdir})")
        client = httpx.Client(base_url=stack.url, timeout=60)

        # ------------------------------------------------------------------ the data
        sources: dict[str, str] = {}
        subsample_info: dict[str, Any] = {}
        for split, n in (
            ("train", args.train_rows),
            ("validation", args.val_rows),
            ("test", args.test_rows),
        ):
            body, counts = subsample(split, n, args.seed)
            r = client.post(
                "/v1/datasets",
                files={"file": (f"{split}.csv", body, "text/csv")},
                data={"name": f"womens clothing {split} ({n} rows, seed {args.seed})"},
            )
            r.raise_for_status()
            dataset = r.json()
            sources[split] = dataset["source"]
            subsample_info[split] = {"rows": n, "dataset": dataset["id"], "classes": counts}
            say(f"uploaded {split}: {n} rows -> {dataset['source']}  {counts}")
        results["subsample"] = subsample_info

        # ------------------------------------------------------------- (a) README config
        config = yaml.safe_load(EXAMPLE.read_text())
        config["data"].update(
            train=sources["train"], validation=sources["validation"], test=sources["test"]
        )
        changes = {"data": "the uploaded subsample", "encoder.max_length": args.max_length}
        config["encoder"]["max_length"] = args.max_length
        if args.epochs is not None:
            changes["epochs"] = args.epochs
            config["epochs"] = args.epochs
        say(f"README config: examples/womens_clothing.yaml; changed: {changes}")
        results["readme_config"] = {"config": config, "changed": changes}

        t0 = time.time()
        r = client.post("/v1/jobs", json={**config, "name": "README config"})
        r.raise_for_status()
        readme_id = r.json()["id"]
        say(f"(a) README config as one job: {readme_id}")
        readme = wait_job(client, readme_id, timeout=3600)
        if readme["state"] != "succeeded":
            raise RuntimeError(f"the README config's job {readme['state']}: {readme.get('error')}")
        readme_val = scores(readme["final_metrics"], "validation")
        readme_test = scores(readme["final_metrics"], "test")
        results["readme_config"].update(
            job=readme_id,
            wall_s=round(time.time() - t0, 1),
            validation=readme_val,
            test=readme_test,
            objective=readme_val["mean_macro_f1"],
        )
        say(
            f"    {time.time() - t0:.0f} s; validation objective (mean macro-F1) "
            f"{fmt(readme_val['mean_macro_f1'])}"
        )
        for task in ("department", "sentiment"):
            say(
                f"    test {task}: accuracy {fmt(readme_test[task]['accuracy'], 3)}, "
                f"macro-F1 {fmt(readme_test[task]['macro_f1'], 3)}"
            )

        # ------------------------------------------------------------------- (b) study
        study_body = {
            "name": "womens clothing (subsample)",
            "base": config,
            "search_space": SEARCH_SPACE,
            "objective": {"metric": "macro_f1"},
            "budget": {"trials": args.trials, "parallel": 1, "max_failures": 3},
            "selection": {"kind": "single"},
            "sampler": "tpe",
            "pruner": "median",
            "seed": args.seed,
            "baselines": {"single_task": True, "sum": True},
        }
        results["study_request"] = study_body
        t1 = time.time()
        r = client.post("/v1/studies", json=study_body)
        if r.status_code != 202:
            raise RuntimeError(f"the study was refused: {r.status_code} {r.text}")
        study_id = r.json()["id"]
        say(
            f"(b) study {study_id}: {args.trials} trials, parallel 1, TPE, median pruning, "
            "baselines on"
        )
        seen: dict[int, str] = {}
        state = None
        deadline = time.monotonic() + 4 * 3600
        while True:
            study = client.get(f"/v1/studies/{study_id}").json()
            LOAD.append(os.getloadavg()[0])
            if study["state"] != state:
                state = study["state"]
                say(f"    [{time.time() - t1:6.0f} s] study {state}")
            for trial in sorted(study["trials"], key=lambda t: t["number"]):
                if seen.get(trial["number"]) == trial["state"]:
                    continue
                seen[trial["number"]] = trial["state"]
                label = (
                    f"baseline {trial['baseline']}"
                    if trial["kind"] == "baseline"
                    else f"trial {trial['number']}"
                )
                extra = ""
                if trial["state"] == "running":
                    extra = short_params(trial["params"]) if trial["kind"] == "search" else ""
                elif trial["value"] is not None:
                    extra = f"value {trial['value']:.4f}"
                elif trial["state"] == "pruned":
                    extra = f"at step {trial['last_step']} ({fmt(trial['intermediate'])})"
                elif trial.get("error"):
                    extra = trial["error"]
                say(f"    [{time.time() - t1:6.0f} s] {label}: {trial['state']} {extra}")
            if study["state"] in TERMINAL_STUDY:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"study {study_id} still {study['state']}")
            time.sleep(3)
        study_wall = time.time() - t1
        if study["state"] != "succeeded":
            say(f"the study {study['state']}: {study.get('error')}")

        trials = study["trials"]  # the leaderboard: completed best first, then by number
        search = [t for t in trials if t["kind"] == "search"]
        jobs = {}
        for t in trials:
            for job_id in t["jobs"]:
                jobs[job_id] = client.get(f"/v1/jobs/{job_id}").json()
        leaderboard = []
        for t in trials:
            job = jobs[t["jobs"][0]] if t["jobs"] else {}
            dur = (
                (job["finished_at"] - job["started_at"])
                if job.get("finished_at") and job.get("started_at")
                else None
            )
            leaderboard.append(
                {
                    "number": t["number"],
                    "kind": t["kind"],
                    "baseline": t["baseline"],
                    "state": t["state"],
                    "value": t["value"],
                    "params": t["params"],
                    "last_step": t["last_step"],
                    "intermediate": t["intermediate"],
                    "job": t["jobs"][0] if t["jobs"] else None,
                    "job_s": round(dur, 1) if dur is not None else None,
                    "test": scores(job.get("final_metrics"), "test") if job else None,
                    "error": t["error"],
                }
            )
        best_value = study["best_value"]
        readme_obj = readme_val["mean_macro_f1"]
        beats = best_value is not None and readme_obj is not None and best_value > readme_obj
        results["study"] = {
            "id": study_id,
            "state": study["state"],
            "error": study.get("error"),
            "wall_s": round(study_wall, 1),
            "trials_started": study["trials_started"],
            "trials_done": study["trials_done"],
            "failures": study["failures"],
            "pruned": sum(t["state"] == "pruned" for t in search),
            "best_trial": study["best_trial"],
            "best_value": best_value,
            "best_params": study["best_params"],
            "best_test": scores(jobs[study["model_job"]].get("final_metrics"), "test")
            if study.get("model_job")
            else None,
            "beats_readme_config_on_validation": beats,
            "margin_over_readme_config": None
            if best_value is None or readme_obj is None
            else best_value - readme_obj,
            "leaderboard": leaderboard,
            "importances": study["importances"],
            "verdict": study["verdict"],
        }

        say()
        say(
            f"study {study['state']} in {study_wall:.0f} s: {study['trials_started']} trials, "
            f"{results['study']['pruned']} pruned, {study['failures']} failed"
        )
        say(
            f"best trial {study['best_trial']}: validation objective {fmt(best_value)} "
            f"({short_params(study['best_params'] or {})})"
        )
        say(
            f"README config: validation objective {fmt(readme_obj)} -> the study's best "
            f"{'beats' if beats else 'does NOT beat'} it "
            f"({'+' if (best_value or 0) >= (readme_obj or 0) else ''}"
            f"{fmt(results['study']['margin_over_readme_config'])})"
        )
        say()
        say("| # | state | objective (val) | test dept F1 | test sent F1 | job s | params |")
        say("| ---: | --- | ---: | ---: | ---: | ---: | --- |")
        for row in sorted(leaderboard, key=lambda r: r["kind"] != "search"):
            test = row["test"] or {}
            name = row["number"] if row["kind"] == "search" else row["baseline"]
            extra = "" if row["state"] != "pruned" else f" (at step {row['last_step']})"
            say(
                f"| {name} | {row['state']}{extra} | {fmt(row['value'])} | "
                f"{fmt((test.get('department') or {}).get('macro_f1'), 3)} | "
                f"{fmt((test.get('sentiment') or {}).get('macro_f1'), 3)} | {row['job_s']} | "
                f"{short_params(row['params']) if row['kind'] == 'search' else ''} |"
            )
        say()
        say(f"importances: {json.dumps(study['importances'])}")
        verdict = study["verdict"]
        if verdict:
            say(
                f"verdict ({verdict['metric']} on {verdict['split']}): Δ_MTL "
                f"{fmt(verdict['delta_mtl'], 2)} %; objective best {fmt(verdict['objective_best'])}"
                f", sum baseline {fmt(verdict['objective_sum'])} (validation)"
            )
            say("| task | multi-task (best) | single-task | difference | sum |")
            say("| --- | ---: | ---: | ---: | ---: |")
            for task, v in verdict["tasks"].items():
                say(
                    f"| {task} | {fmt(v['multi_task'])} | {fmt(v['single_task'])} | "
                    f"{fmt(v['difference'])} | {fmt(v['sum'])} |"
                )

        # ------------------------------------------------------- scheduling overhead
        everything = [{"id": readme_id, "started_at": readme["started_at"], "what": "readme"}]
        for t in trials:
            for job_id in t["jobs"]:
                label = f"trial {t['number']}" if t["kind"] == "search" else t["baseline"]
                everything.append(
                    {"id": job_id, "started_at": jobs[job_id]["started_at"], "what": label}
                )
        watch.stop()
        timeline = scheduling(stack, watch, [j for j in everything if j["started_at"]])
        by_job = {row["job"]: row for row in timeline}
        order = sorted(search, key=lambda t: t["number"])
        # the driver's own events (time stamped as written): "finished"/"pruned" once it has
        # told Optuna about a trial
        told: dict[int, float] = {}
        reported: dict[tuple[int, int], float] = {}
        for event in stack.study_events(study_id):
            data = event.get("data") or {}
            if event.get("type") != "trial" or "trial" not in data:
                continue
            if data.get("event") in ("finished", "pruned", "failed"):
                told.setdefault(data["trial"], event["time"])
            elif data.get("event") == "reported":
                reported.setdefault((data["trial"], data["step"]), event["time"])
        # how soon the driver passes a validation evaluation on to the pruner: its poll latency
        report_lag = []
        for t in order:
            if not t["jobs"]:
                continue
            for m in stack.metric_events(t["jobs"][0]):
                split = (m.get("data") or {}).get("split", "validation")
                if m["type"] == "evaluate" and split == "validation":
                    at = (t["number"], m["step"])
                    if at in reported:
                        report_lag.append(reported[at] - m["time"])
        pairs = []
        for prev, nxt in itertools.pairwise(order):
            if not prev["jobs"] or not nxt["jobs"]:
                continue
            a, b = by_job.get(prev["jobs"][0]), by_job.get(nxt["jobs"][0])
            if a is None or b is None or a["finished_at"] is None:
                continue
            pairs.append(
                {
                    "from": prev["number"],
                    "to": nxt["number"],
                    "prev_state": a["state"],
                    "gap_s": b["started_at"] - a["finished_at"],
                    # the driver: it sees the end, tells Optuna, asks, validates, creates
                    "finished_to_created_s": b["created_at"] - a["finished_at"],
                    "finished_to_told_s": (told[prev["number"]] - a["finished_at"])
                    if prev["number"] in told
                    else None,
                    "told_to_created_s": (b["created_at"] - told[prev["number"]])
                    if prev["number"] in told
                    else None,
                    # publish, then Celery's main process takes the message from Redis
                    "created_to_received_s": (b["received_at"] - b["created_at"])
                    if b["received_at"]
                    else None,
                    # a fresh child process: fork, worker_process_init, the task, begin
                    "received_to_started_s": (b["started_at"] - b["received_at"])
                    if b["received_at"]
                    else None,
                    **child_times(a, b),
                }
            )
        # jobs whose successor was already queued (the baselines): the worker alone
        queued_next = []
        for a, b in itertools.pairwise(timeline):
            if a["finished_at"] and b["created_at"] < a["finished_at"]:
                queued_next.append(
                    {
                        "from": a["what"],
                        "to": b["what"],
                        "gap_s": b["started_at"] - a["finished_at"],
                        "received_to_started_s": (b["started_at"] - b["received_at"])
                        if b["received_at"]
                        else None,
                        **child_times(a, b),
                    }
                )

        def col(rows: list[dict[str, Any]], key: str) -> list[float]:
            return [r[key] for r in rows if r.get(key) is not None]

        overhead: dict[str, Any] = {
            "pairs": [
                {k: round(v, 3) if isinstance(v, float) else v for k, v in p.items()} for p in pairs
            ],
            "gap_s": stats(col(pairs, "gap_s")),
            "after_complete_s": stats(
                col([p for p in pairs if p["prev_state"] == "succeeded"], "gap_s")
            ),
            "after_pruned_s": stats(
                col([p for p in pairs if p["prev_state"] == "cancelled"], "gap_s")
            ),
            "finished_to_created_s": stats(col(pairs, "finished_to_created_s")),
            "finished_to_told_s": stats(col(pairs, "finished_to_told_s")),
            "told_to_created_s": stats(col(pairs, "told_to_created_s")),
            "created_to_received_s": stats(col(pairs, "created_to_received_s")),
            "received_to_started_s": stats(col(pairs, "received_to_started_s")),
            "finished_to_exit_s": stats(col(pairs, "finished_to_exit_s")),
            "exit_to_fork_s": stats(col(pairs, "exit_to_fork_s")),
            "fork_to_started_s": stats(col(pairs, "fork_to_started_s")),
            "successor_already_queued": {
                "pairs": [
                    {k: round(v, 3) if isinstance(v, float) else v for k, v in p.items()}
                    for p in queued_next
                ],
                "gap_s": stats(col(queued_next, "gap_s")),
                "finished_to_exit_s": stats(col(queued_next, "finished_to_exit_s")),
                "exit_to_fork_s": stats(col(queued_next, "exit_to_fork_s")),
                "fork_to_started_s": stats(col(queued_next, "fork_to_started_s")),
            },
            "evaluation_to_reported_s": stats(report_lag),
            "target_s": 1.0,
            "meets_target": bool(pairs) and max(col(pairs, "gap_s")) <= 1.0,
        }
        results["scheduling"] = overhead
        results["timeline"] = [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            for row in timeline
        ]
        say()
        g = overhead["gap_s"]
        say(
            f"scheduling overhead, search trial job finished -> next trial job started "
            f"({g['n']} pairs): min {g['min']} s, median {g['median']} s, max {g['max']} s "
            f"(target <= 1 s: {'met' if overhead['meets_target'] else 'MISSED'})"
        )
        for key, what in (
            ("after_complete_s", "after a completed trial"),
            ("after_pruned_s", "after a pruned trial"),
            ("finished_to_created_s", "  finished -> successor created (study driver)"),
            ("finished_to_told_s", "    finished -> trial told to Optuna (poll, follow, tell)"),
            ("told_to_created_s", "    told -> successor job created (ask, validate, record)"),
            ("created_to_received_s", "  created -> received (publish, Celery takes it)"),
            ("received_to_started_s", "  received -> started (fresh child, begin)"),
            ("finished_to_exit_s", "  worker: job finished -> its pool process exited"),
            ("exit_to_fork_s", "  worker: pool process exited -> replacement forked"),
            ("fork_to_started_s", "  worker: replacement forked -> next job started"),
        ):
            s = overhead[key]
            say(f"  {what}: n {s['n']}, min {s['min']}, median {s['median']}, max {s['max']} s")
        s = overhead["evaluation_to_reported_s"]
        say(
            f"  driver poll latency, a validation evaluation -> reported to the pruner: n "
            f"{s['n']}, min {s['min']}, median {s['median']}, max {s['max']} s"
        )
        for key in ("gap_s", "finished_to_exit_s", "exit_to_fork_s", "fork_to_started_s"):
            s = overhead["successor_already_queued"][key]
            say(
                f"  successor already queued (baselines), {key}: n {s['n']}, min {s['min']}, "
                f"median {s['median']}, max {s['max']} s"
            )
        say(
            "| from -> to | prev | gap | driver | (notice+tell | ask+create) | publish+take | "
            "received->started | finished->exit | exit->fork | fork->started |"
        )
        say("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for p in pairs:
            say(
                f"| {p['from']} -> {p['to']} | {p['prev_state']} | {p['gap_s']:.3f} | "
                f"{p['finished_to_created_s']:.3f} | {fmt(p['finished_to_told_s'], 3)} | "
                f"{fmt(p['told_to_created_s'], 3)} | {fmt(p['created_to_received_s'], 3)} | "
                f"{fmt(p['received_to_started_s'], 3)} | {fmt(p['finished_to_exit_s'], 3)} | "
                f"{fmt(p['exit_to_fork_s'], 3)} | {fmt(p['fork_to_started_s'], 3)} |"
            )
        client.close()
    finally:
        stack.stop()
        total = time.time() - t_start
        results["wall_s"] = round(total, 1)
        machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        machine["loadavg_1min_during"] = stats(LOAD) | (
            {"mean": round(statistics.fmean(LOAD), 2)} if LOAD else {}
        )
        say()
        say(
            f"total wall time {total:.0f} s ({total / 60:.1f} min); load average (1/5/15 min) "
            f"at the start {machine['loadavg_at_start']}, at the end {machine['loadavg_at_end']}"
        )
        say(f"1-minute load average while it ran (2 cores): {machine['loadavg_1min_during']}")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        say(f"wrote {args.json} and {log_path}")
        if args.keep:
            say(f"work folder kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        _LOG.close()


if __name__ == "__main__":
    main()
