"""Prometheus metrics of one API process (`GET /metrics`).

mtl_jobs{state}                          jobs per state (read from Redis at scrape time)
mtl_queue_length                         jobs waiting for a worker
mtl_sse_events_sent_total                events written to SSE clients
mtl_http_request_duration_seconds{...}   request latency by method, route and status
mtl_predict_batch_texts                  texts per model run of predict (the batcher's batches)
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.records import JobState

__all__ = ["ServiceMetrics"]

STATES = tuple(JobState)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("mtl_jobs", "jobs per state", ["state"], registry=self.registry)
        self.queue = Gauge("mtl_queue_length", "jobs waiting for a worker", registry=self.registry)
        self.events = Counter(
            "mtl_sse_events_sent", "events written to SSE clients", registry=self.registry
        )
        self.latency = Histogram(
            "mtl_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.predict_batch = Histogram(
            "mtl_predict_batch_texts",
            "texts per model run of predict (concurrent calls on one model run together)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """A pure ASGI middleware timing each request (streams excluded: their duration is
        not a latency)."""

        async def timed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            status = [500]

            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, send_status)
            finally:
                path = getattr(scope.get("route"), "path", "unmatched")
                if not path.endswith("/events"):
                    self.latency.labels(scope["method"], path, str(status[0])).observe(
                        time.perf_counter() - started
                    )

        return timed

    def render(self, jobs_by_state: dict[str, int], queue_length: int) -> bytes:
        for state in STATES:
            self.jobs.labels(state).set(jobs_by_state.get(state, 0))
        self.queue.set(queue_length)
        return generate_latest(self.registry)
