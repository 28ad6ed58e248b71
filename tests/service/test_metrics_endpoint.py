"""`GET /metrics` of the running API, parsed as Prometheus reads it.

The gauges are read from Redis at scrape time and cover every owner of the shared test
service, so the test first waits until no job is active, then checks differences between
scrapes: one job succeeded and one cancelled between two scrapes move those counts by exactly
one. The API is a single uvicorn process, so its counters and histograms see every request.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.records import JobState
from tests.service.conftest import DUMMY, long_config, read_sse, submit, wait_for, wait_step

pytestmark = pytest.mark.slow

TERMINAL = {"succeeded", "failed", "cancelled"}
ACTIVE = ("queued", "running", "cancelling")
STATES = [s.value for s in JobState]


class Scrape:
    """One scrape of /metrics: samples by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), default)

    def jobs(self) -> dict[str, int]:
        family = self.families["mtl_jobs"]
        counts = {s.labels["state"]: s.value for s in family.samples}
        assert all(v == int(v) and v >= 0 for v in counts.values()), counts
        return {k: int(v) for k, v in counts.items()}


def route_label(scraped: Scrape, template: str) -> str:
    """The `route` label the latency histogram gives `template`: the route's URL template
    (`/v1/jobs/{job_id}`, one series per route whatever the job id)."""
    family = scraped.families["mtl_http_request_duration_seconds"]
    labels = {s.labels["route"] for s in family.samples}
    assert template in labels, (template, sorted(labels))
    return template


def scrape(service: str) -> Scrape:
    r = httpx.get(f"{service}/metrics", timeout=10)  # no key: Prometheus scrapes it as is
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(r.text)


def listed_totals(clients: list[httpx.Client]) -> dict[str, int]:
    """Jobs per state as the API lists them, summed over the service's owners."""
    totals = {}
    for state in STATES:
        totals[state] = sum(
            c.get("/v1/jobs", params={"state": state, "limit": 1}).json()["total"] for c in clients
        )
    return totals


def settled(service: str, clients: list[httpx.Client], timeout: float = 120) -> Scrape:
    """A scrape taken while nothing is active, matching what the API lists (another test's
    job may still be finishing: wait until it has)."""
    deadline = time.monotonic() + timeout
    while True:
        first = scrape(service)
        listed = listed_totals(clients)
        second = scrape(service)
        quiet = all(first.jobs()[s] == 0 for s in ACTIVE)
        if quiet and first.jobs() == second.jobs() == listed:
            return second
        if time.monotonic() > deadline:
            raise AssertionError(f"never settled: {first.jobs()} {listed} {second.jobs()}")
        time.sleep(0.2)


def test_metrics_count_jobs_events_and_request_latency(
    service: str, client: httpx.Client, bob: httpx.Client
) -> None:
    before = settled(service, [client, bob])
    counts = before.jobs()
    assert sorted(counts) == sorted(STATES)  # every state has its series, zeros included
    assert before.families["mtl_jobs"].type == "gauge"
    assert before.value("mtl_queue_length") == 0

    # a job running and one waiting behind it
    blocker = submit(client, long_config(steps=5000))["id"]
    assert wait_step(client, blocker, 1)["state"] == "running"
    waiting = submit(client, DUMMY)["id"]
    busy = scrape(service)
    assert busy.jobs() == {
        **counts,
        "running": counts["running"] + 1,
        "queued": counts["queued"] + 1,
    }
    assert busy.value("mtl_queue_length") == 1
    assert client.get(f"/v1/jobs/{waiting}").json()["queue_position"] == 1

    client.post(f"/v1/jobs/{blocker}/cancel")
    assert wait_for(client, blocker, TERMINAL, timeout=30)["state"] == "cancelled"
    assert wait_for(client, waiting, TERMINAL, timeout=120)["state"] == "succeeded"

    # the event counter: exactly the events (with an id) this stream sent; keep-alive
    # comments and the closing `end` are not counted
    ahead = scrape(service)
    events, _ = read_sse(client, waiting)
    after_stream = scrape(service)
    sent = [e for e in events if "id" in e]
    assert events[-1]["event"] == "end" and len(sent) > 5
    assert after_stream.families["mtl_sse_events_sent"].type == "counter"
    grew = after_stream.value("mtl_sse_events_sent_total") - ahead.value(
        "mtl_sse_events_sent_total"
    )
    assert grew == len(sent)

    after = settled(service, [client, bob])
    assert after.jobs() == {
        **counts,
        "succeeded": counts["succeeded"] + 1,
        "cancelled": counts["cancelled"] + 1,
    }
    assert after.value("mtl_queue_length") == 0

    # latency: three answered requests of one route, one 404 of the same route
    h = "mtl_http_request_duration_seconds"
    first = scrape(service)
    for _ in range(3):
        assert client.get(f"/v1/jobs/{waiting}/config").status_code == 200
    assert client.get("/v1/jobs/job_00000000000000000000").status_code == 404
    second = scrape(service)
    assert second.families[h].type == "histogram"
    config_route = route_label(second, "/v1/jobs/{job_id}/config")
    ok: dict[str, Any] = {"method": "GET", "route": config_route, "status": "200"}
    missing = {"method": "GET", "route": route_label(second, "/v1/jobs/{job_id}"), "status": "404"}
    assert second.value(f"{h}_count", **ok) - first.get(f"{h}_count", **ok) == 3
    assert second.value(f"{h}_count", **missing) - first.get(f"{h}_count", **missing) == 1
    took = second.value(f"{h}_sum", **ok) - first.get(f"{h}_sum", **ok)
    assert 0 < took < 30
    # the buckets are cumulative and end with +Inf == count
    buckets = [
        (float(s.labels["le"]), s.value)
        for s in second.families[h].samples
        if s.name == f"{h}_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == ok
    ]
    assert buckets == sorted(buckets) and buckets[-1][0] == float("inf")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1][1] == second.value(f"{h}_count", **ok)
    # a scrape is itself timed (after its answer was written: the next scrape shows it)
    scrapes = {"method": "GET", "route": "/metrics", "status": "200"}
    assert second.value(f"{h}_count", **scrapes) - first.value(f"{h}_count", **scrapes) == 1
    routes = {s.labels["route"] for s in second.families[h].samples}
    assert not [r for r in routes if waiting in r]  # templates, not URLs
    # event streams are not timed: their duration is not a latency
    assert not [r for r in routes if r.endswith("/events")], routes
