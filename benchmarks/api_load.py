"""Load benchmark of the job service, on loopback, with its own Redis, API and worker.

    python benchmarks/api_load.py [--quick] [--json FILE]

Three measurements (targets in brackets; docs/performance.md has the results):

1. submit latency, p50/p99, of `POST /v1/jobs` with 50 concurrent clients [p99 <= 25 ms].
   Each client keeps one connection and submits the two-task dummy job, then pauses for its
   think time (default 250 ms, jittered), so the offered load is stated, not saturating: with
   closed-loop clients that never pause, latency is just concurrency / throughput (Little's
   law) and says nothing about the service. The saturated throughput is reported as well.
   No worker runs in this phase (the jobs only queue).
2. event delivery latency, p50/p99, to 100 SSE subscribers of one running job
   [p99 <= 100 ms]: for every event each subscriber receives, (time received) - (the event's
   `time`, stamped by the worker just before XADD). All processes share one clock.
3. training step time with Redis progress reporting vs without [overhead <= 1%]: the same
   training run in this process, alternately with no callbacks and with the worker's
   `RedisProgress` callback plus its `LeaseKeeper` thread (lease renewal, progress writes,
   cancel flag), talking to the benchmark's Redis. Reported: the mean step time of each run
   (log steps included), the median of those over `--repeats` alternating runs per arm, and
   the ratio of the two medians.

Every loop is bounded (counts and timeouts); everything listens on 127.0.0.1 and is stopped
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.embedded import RedisServer, free_port, start_worker, stop_process  # noqa: E402

#: The job the results in docs/performance.md were measured with (the Swagger example as it was
#: then: 32 steps; the example itself now trains 96 steps so that it visibly learns).
DUMMY: dict[str, Any] = {
    "name": "two-task dummy (CPU, seconds)",
    "encoder": {
        "random_init": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "vocab_size": 30522,
            "max_position_embeddings": 128,
        },
        "max_length": 32,
    },
    "tasks": [{"name": "task_a", "num_classes": 5}, {"name": "task_b", "num_classes": 3}],
    "data": {
        "kind": "dummy",
        "num_samples": 512,
        "eval_samples": 128,
        "seq_len": 32,
        "learnable": True,
    },
    "epochs": 2,
    "batch_size": 32,
    "log_every": 5,
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------------ processes


class Stack:
    """Redis, the API (uvicorn subprocess) and optionally a worker."""

    def __init__(self, workdir: Path, api_workers: int = 1) -> None:
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis", password="bench-pass")
        self.port = free_port()
        self.api_workers = api_workers
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_redis(self) -> None:
        self.redis.start()
        self.env = {
            "MTL_REDIS_URL": self.redis.url,
            "MTL_DATA_DIR": str(self.workdir / "data"),
            "MTL_KEY_PREFIX": "bench",
            "MTL_QUEUE_NAME": "bench",
            "MTL_SSE_KEEPALIVE_S": "5",
            "MTL_HEARTBEAT_S": "1",
            "MTL_TORCH_THREADS": "1",
            "MTL_MAX_ACTIVE_JOBS_PER_KEY": "0",  # the submit benchmark queues thousands
            "TOKENIZERS_PARALLELISM": "false",
        }

    def start_api(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        log = open(self.workdir / "api.log", "ab")  # noqa: SIM115 (kept by the child)
        self.api = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
             "--workers", str(self.api_workers), "--no-access-log"],
            env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the API did not start; see " + str(self.workdir / "api.log"))

    def start_worker(self) -> None:
        self.worker = start_worker(
            self.env, queue="bench", log_file=self.workdir / "worker.log", name="bench@%h"
        )
        import redis

        client = redis.Redis.from_url(self.redis.url)
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline:
                if client.zcard("bench:workers"):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError("the worker did not start; see " + str(self.workdir / "worker.log"))

    def flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis.url)
        client.flushall()
        client.close()

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None:
                stop_process(proc, sig=signal.SIGQUIT if proc is self.worker else signal.SIGTERM)
        self.redis.stop()


# ------------------------------------------------------------------------------ 1. submit


class RawClient:
    """A bare keep-alive HTTP/1.1 client on asyncio streams. The benchmark's clients run on
    the same cores as the service; a heavy client (httpx costs about as much CPU per request
    as the endpoint itself) would measure mostly itself."""

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


async def bench_submit(url: str, clients: int, per_client: int, think_ms: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    body = json.dumps(DUMMY).encode()

    async def one_client(i: int) -> None:
        nonlocal errors
        rng = random.Random(i)
        async with RawClient(url) as client:
            for _ in range(2):  # warm-up, not measured: connection, scripts, thread pool
                await client.post_json("/v1/jobs", body)
            await asyncio.sleep(rng.uniform(0, think_ms / 1000))  # spread the starts
            for _ in range(per_client):
                started = time.perf_counter()
                status, _ = await client.post_json("/v1/jobs", body)
                latencies.append((time.perf_counter() - started) * 1000)
                if status != 202:
                    errors += 1
                if think_ms:
                    await asyncio.sleep(rng.uniform(0.5, 1.5) * think_ms / 1000)

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(clients))), 600)
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(latencies),
        "think_ms": think_ms,
        "throughput_rps": round(len(latencies) / wall, 1),
        "p50_ms": round(pct(latencies, 0.50), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "errors": errors,
    }


# ------------------------------------------------------------------------------ 2. SSE


async def bench_sse(
    url: str,
    subscribers: int,
    config: dict[str, Any],
    timeout: float,
    start_worker: Any = None,
) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    per_sub: list[int] = []
    first_seen: dict[str, float] = {}
    by_event: dict[str, list[float]] = {}
    ready_at: list[float | None] = [None]
    to_redis: list[float] = []  # stamped by the worker -> XADD (ms resolution)
    from_redis: list[float] = []  # XADD -> received by the subscriber

    host, port = url.removeprefix("http://").split(":")

    async def subscriber(job_id: str, ready: asyncio.Event, counter: list[int]) -> None:
        # A bare HTTP/1.1 client (asyncio streams): the measurement should see the server's
        # delivery time, not a heavy client's parsing time on the same two cores.
        got = 0
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        assert b"chunked" in head.lower()
        counter[0] += 1
        if counter[0] == subscribers:
            ready_at[0] = time.time()
            ready.set()
        buffer = b""
        try:
            while True:
                size = int((await reader.readline()).strip() or b"0", 16)
                if size == 0:
                    break
                chunk = await reader.readexactly(size + 2)
                now = time.time()
                buffer += chunk[:-2]
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    event, data, entry_id = None, None, None
                    for line in raw.split(b"\n"):
                        if line.startswith(b"event: "):
                            event = line[7:].decode()
                        elif line.startswith(b"data: "):
                            data = line[6:]
                        elif line.startswith(b"id: "):
                            entry_id = line[4:]
                    if event == "end":
                        per_sub.append(got)
                        return
                    if data is None or event is None:
                        continue
                    payload = json.loads(data)
                    # only events emitted once every subscriber was connected: earlier ones
                    # are a replay, not a delivery
                    if (
                        event in ("log", "evaluate", "checkpoint")
                        and ready_at[0] is not None
                        and payload["time"] > ready_at[0]
                    ):
                        latencies.append((now - payload["time"]) * 1000)
                        if entry_id is not None:  # the stream id starts with Redis' clock (ms)
                            added = int(entry_id.split(b"-")[0]) / 1000
                            to_redis.append((added - payload["time"]) * 1000)
                            from_redis.append((now - added) * 1000)
                        key = f"{event}:{payload['step']}"
                        by_event.setdefault(key, []).append(latencies[-1])
                        first_seen.setdefault(key, now)
                        got += 1
        finally:
            writer.close()

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        r = await client.post("/v1/jobs", json=config)
        r.raise_for_status()
        job_id = r.json()["id"]
    ready = asyncio.Event()
    counter = [0]
    tasks = [asyncio.create_task(subscriber(job_id, ready, counter)) for _ in range(subscribers)]
    await asyncio.wait_for(ready.wait(), 60)
    if start_worker is not None:  # the job starts once everyone listens
        await asyncio.to_thread(start_worker)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
    worst = sorted(by_event.items(), key=lambda kv: -max(kv[1]))[:5]
    return {
        "subscribers": subscribers,
        "job_state": job["state"],
        "worst_events": {k: [round(min(v), 1), round(max(v), 1)] for k, v in worst},
        "events_per_subscriber": min(per_sub) if per_sub else 0,
        "deliveries": len(latencies),
        "p50_ms": round(pct(latencies, 0.50), 2),
        "p99_ms": round(pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2) if latencies else None,
        "worker_to_redis_p99_ms": round(pct(to_redis, 0.99), 1),
        "redis_to_subscriber_p50_ms": round(pct(from_redis, 0.5), 1),
        "redis_to_subscriber_p99_ms": round(pct(from_redis, 0.99), 1),
        "event_rate_per_s": round(
            len(first_seen) / max(1e-9, max(first_seen.values()) - min(first_seen.values())), 1
        )
        if len(first_seen) > 1
        else None,
    }


# ------------------------------------------------------------------------------ 3. overhead


def bench_overhead(redis_url: str, steps: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import redis
    import torch

    from mtl.callbacks import Callback, TrainControl, TrainState
    from mtl.config import TrainConfig
    from mtl.trainer import train
    from service.async_store import AsyncJobStore, NewJob
    from service.keys import Keys
    from service.settings import Settings
    from service.store import BeginOutcome, JobStore, Lease
    from worker.progress import LeaseKeeper, RedisProgress

    torch.set_num_threads(1)
    cfg = json.loads(json.dumps(DUMMY))
    cfg.pop("name")
    cfg["encoder"]["random_init"].update(
        hidden_size=128, intermediate_size=512, num_attention_heads=4
    )
    cfg["encoder"]["max_length"] = 64
    cfg["data"].update(num_samples=32 * steps, eval_samples=32, seq_len=64)
    cfg.update(max_steps=steps, log_every=10, eval_every=None, grad_conflict_every=0)
    config = TrainConfig.model_validate(cfg)
    settings = Settings(redis_url=redis_url, key_prefix="overhead", cancel_poll_s=0.25)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.last: float | None = None

        def on_step_end(self, state: TrainState, control: TrainControl) -> None:
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(settings.key_prefix)
    store = JobStore(client, keys)

    def new_lease() -> Lease:
        async def create() -> str:
            import redis.asyncio as aioredis

            ac = aioredis.Redis.from_url(redis_url, decode_responses=True)
            try:
                created = await AsyncJobStore(ac, keys).create(
                    NewJob(
                        owner="bench",
                        name=None,
                        config_json=config.model_dump_json(),
                        max_attempts=1,
                    )
                )
            finally:
                await ac.aclose()
            assert created.job_id is not None
            return created.job_id

        lease = Lease(asyncio.run(create()), 1, "bench")
        assert store.begin(lease, 30_000).outcome is BeginOutcome.STARTED
        return lease

    class TimedProgress(RedisProgress):
        """The worker's callback, with the time its hooks take on the training thread."""

        spent = 0.0

        def _timed(self, name: str, *args: Any) -> None:
            started = time.perf_counter()
            getattr(super(), name)(*args)
            self.spent += time.perf_counter() - started

        def on_train_begin(self, *a: Any) -> None:
            self._timed("on_train_begin", *a)

        def on_step_end(self, *a: Any) -> None:
            self._timed("on_step_end", *a)

        def on_log(self, *a: Any) -> None:
            self._timed("on_log", *a)

        def on_evaluate(self, *a: Any) -> None:
            self._timed("on_evaluate", *a)

        def on_checkpoint(self, *a: Any) -> None:
            self._timed("on_checkpoint", *a)

    class TimedKeeper(LeaseKeeper):
        cpu = 0.0

        def run(self) -> None:
            started = time.thread_time()
            try:
                super().run()
            finally:
                self.cpu = time.thread_time() - started

    def one_run(report: bool, index: int) -> dict[str, float]:
        timer = StepTimer()
        callbacks: list[Callback] = [timer]
        keeper = progress = None
        if report:
            lease = new_lease()
            progress = TimedProgress(
                store, lease, lease_ms=30_000, monitor=config.monitor, monitor_mode="max"
            )
            keeper = TimedKeeper(store, progress, lease_ms=30_000, interval=settings.cancel_poll_s)
            keeper.start()
            callbacks.insert(0, progress)
        started = time.perf_counter()
        try:
            train(config, workdir / f"run-{index}-{int(report)}", callbacks=callbacks, resume=False)
        finally:
            if keeper is not None:
                keeper.stop()
        wall = time.perf_counter() - started
        # the steady state (log steps included): drop warm-up and the closing
        # evaluation/checkpoint/export, and the slowest 2% (scheduler noise, both arms alike)
        body = sorted(timer.times[10:-2])
        body = body[: max(1, int(len(body) * 0.98))]
        return {
            "step": statistics.fmean(body),
            "wall": wall,
            "hooks": progress.spent if progress is not None else 0.0,
            "keeper_cpu": keeper.cpu if keeper is not None else 0.0,
        }

    one_run(False, -1)  # warm-up (allocator, kernels)
    plain: list[dict[str, float]] = []
    reported: list[dict[str, float]] = []
    for i in range(repeats):
        order = [False, True] if i % 2 == 0 else [True, False]
        for report in order:
            (reported if report else plain).append(one_run(report, i))
    client.close()
    # A/B: back-to-back pairs cancel slow drift; the median pair ratio
    ratios = [r["step"] / p["step"] for r, p in zip(reported, plain, strict=True)]
    ratio = statistics.median(ratios)
    # direct accounting: time in the callback's hooks on the training thread plus all CPU
    # time of the lease thread, as a share of the run
    direct = statistics.median((r["hooks"] + r["keeper_cpu"]) / r["wall"] for r in reported)
    return {
        "steps_per_run": steps,
        "repeats": repeats,
        "step_ms_without": round(statistics.median(p["step"] for p in plain) * 1000, 3),
        "step_ms_with_reporting": round(statistics.median(r["step"] for r in reported) * 1000, 3),
        "ratio": round(ratio, 4),
        "overhead_pct": round((ratio - 1) * 100, 2),
        "pair_ratios": [round(x, 4) for x in ratios],
        "direct_overhead_pct": round(direct * 100, 3),
        "hooks_ms_per_run": round(statistics.median(r["hooks"] for r in reported) * 1000, 2),
        "keeper_cpu_ms_per_run": round(
            statistics.median(r["keeper_cpu"] for r in reported) * 1000, 2
        ),
    }


# ------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--submits-per-client", type=int, default=20)
    parser.add_argument("--think-ms", type=float, default=250.0)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--sse-steps", type=int, default=400, help="steps of the streamed job")
    parser.add_argument("--sse-log-every", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200, help="steps per overhead run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating overhead runs")
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small counts (a smoke run)")
    parser.add_argument("--only", choices=["submit", "sse", "overhead"], action="append")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.submits_per_client, args.subscribers, args.sse_steps = 4, 20, 80
        args.steps, args.repeats = 60, 1
    only = set(args.only or ["submit", "sse", "overhead"])

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="mtl-bench-") as tmp:
        workdir = Path(tmp)
        stack = Stack(workdir, api_workers=args.api_workers)
        try:
            stack.start_redis()
            if "overhead" in only:
                print("3. training step time with / without Redis reporting ...", flush=True)
                results["overhead"] = bench_overhead(
                    stack.redis.url, args.steps, args.repeats, workdir
                )
                print(json.dumps(results["overhead"]), flush=True)
                stack.flush()
            stack.start_api()
            # the measuring client is Python too: keep its full GC passes (tens of ms with
            # everything imported) out of the numbers, as the API does for itself
            gc.collect()
            gc.freeze()
            if "submit" in only:
                print(f"1. submit latency, {args.clients} clients ...", flush=True)
                results["submit"] = asyncio.run(
                    bench_submit(stack.url, args.clients, args.submits_per_client, args.think_ms)
                )
                print(json.dumps(results["submit"]), flush=True)
                results["submit_saturated"] = asyncio.run(
                    bench_submit(stack.url, args.clients, max(2, args.submits_per_client // 4), 0)
                )
                print(json.dumps(results["submit_saturated"]), flush=True)
                stack.flush()
            if "sse" in only:
                print(f"2. SSE delivery latency, {args.subscribers} subscribers ...", flush=True)
                cfg = json.loads(json.dumps(DUMMY))
                cfg.pop("name")
                cfg["data"].update(num_samples=16 * args.sse_steps, eval_samples=64)
                cfg.update(
                    batch_size=16,
                    max_steps=args.sse_steps,
                    log_every=args.sse_log_every,
                    eval_every=100,
                )
                results["sse"] = asyncio.run(
                    bench_sse(
                        stack.url,
                        args.subscribers,
                        cfg,
                        timeout=600,
                        start_worker=stack.start_worker,
                    )
                )
                print(json.dumps(results["sse"]), flush=True)
        finally:
            stack.stop()

    targets = []
    if "submit" in results:
        targets.append(("submit p99 <= 25 ms", results["submit"]["p99_ms"] <= 25))
    if "sse" in results:
        targets.append(("SSE p99 <= 100 ms", results["sse"]["p99_ms"] <= 100))
    if "overhead" in results:
        o = results["overhead"]
        targets.append(("reporting overhead <= 1% (direct)", o["direct_overhead_pct"] <= 1))
        targets.append(("reporting overhead <= 1% (A/B)", o["overhead_pct"] <= 1))
    results["targets"] = {name: ok for name, ok in targets}
    print("\n| measurement | p50 / value | p99 | target |")
    print("| --- | --- | --- | --- |")
    if "submit" in results:
        s = results["submit"]
        print(
            f"| submit, {s['clients']} clients, {s['throughput_rps']} req/s offered "
            f"| {s['p50_ms']} ms | {s['p99_ms']} ms | p99 <= 25 ms |"
        )
        z = results["submit_saturated"]
        print(
            f"| submit, {z['clients']} clients, no pause (saturated: {z['throughput_rps']} "
            f"req/s) | {z['p50_ms']} ms | {z['p99_ms']} ms | - |"
        )
    if "sse" in results:
        s = results["sse"]
        print(
            f"| SSE delivery, {s['subscribers']} subscribers, {s['event_rate_per_s']} events/s "
            f"| {s['p50_ms']} ms | {s['p99_ms']} ms | p99 <= 100 ms |"
        )
    if "overhead" in results:
        o = results["overhead"]
        print(
            f"| step time with / without reporting (A/B) | {o['step_ms_with_reporting']} / "
            f"{o['step_ms_without']} ms (ratio {o['ratio']}) | - | <= 1% |"
        )
        print(
            f"| reporting cost on the training process (direct) | "
            f"{o['direct_overhead_pct']}% | - | <= 1% |"
        )
    for name, ok in targets:
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
