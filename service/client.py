"""A small HTTP client for the job service (what `mtl submit/jobs/status/logs/...` and
`mtl study ...` use).

    client = JobClient("http://127.0.0.1:8000", api_key=None)
    job = client.submit(config_dict)
    for event in client.events(job["id"]):      # resumes with Last-Event-ID on a dropped link
        ...
    study = client.submit_study(study_body)
    for event in client.study_events(study["id"]):  # the same, for a study's stream
        ...

Only httpx: no web framework, no queue. Errors from the service become `ServiceError`, whose
message is the service's own explanation (e.g. which config field is invalid).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse

from mtl.errors import MTLError
from service.records import Event as StreamEntry

__all__ = ["Event", "JobClient", "ServiceError", "StudyStreamEvent"]

TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceError(MTLError):
    """The service answered with an error (or could not be reached)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Event:
    """One message of a job's event stream: an entry (`service.records.Event`, with its stream
    id) or the closing `end` (no attempt or step; `data` is {"state": ...})."""

    id: str
    type: str  # log | evaluate | checkpoint | state | resume | end
    attempt: int | None
    step: int | None
    data: dict[str, Any]


@dataclass
class StudyStreamEvent:
    """One message of a study's event stream: `state` ({"state", "error"?}), `trial`
    ({"trial", "event": queued/reported/finished/pruned/failed, "value", "params", "jobs",
    "baseline", ...}), `best` ({"trial", "value", "params"}) or the closing `end`
    ({"state": ...}; no time)."""

    id: str
    type: str  # state | trial | best | end
    time: float | None
    data: dict[str, Any]


class _Reconnect(Exception):
    """An event stream to open again with Last-Event-ID: it ended with `error`, or the
    service answered 503 (its Redis is away for a moment)."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(str(error))
        self.error = error


def _explain(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # validation errors: name each field
        parts = []
        for err in detail:
            loc = ".".join(str(p) for p in err.get("loc", []) if p != "body")
            parts.append(f"{loc or '(body)'}: {err.get('msg', err)}")
        return f"HTTP {response.status_code}: " + "; ".join(parts)
    return f"HTTP {response.status_code}: {detail}"


class JobClient:
    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise ServiceError(f"cannot reach {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            raise ServiceError(_explain(response), response.status_code)
        return response

    # ------------------------------------------------------------------------------ jobs
    def submit(
        self,
        config: dict[str, Any],
        name: str | None = None,
        idempotency_key: str | None = None,
        priority: str | None = None,
    ) -> dict[str, Any]:
        body = dict(config)
        if name is not None:
            body["name"] = name
        if priority is not None:
            body["priority"] = priority
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/jobs", json=body, headers=headers).json()

    def jobs(self, state: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._call("GET", "/v1/jobs", params=params).json()["items"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def predict(self, job_id: str, texts: list[str]) -> list[dict[str, Any]]:
        body = {"texts": texts}
        return self._call("POST", f"/v1/jobs/{job_id}/predict", json=body).json()["predictions"]

    def download(self, job_id: str, target: Path) -> Path:
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/model") as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServiceError(_explain(response), response.status_code)
                tmp = target.with_name(f".{target.name}.part")
                with open(tmp, "wb") as fh:
                    for chunk in response.iter_bytes():
                        fh.write(chunk)
                tmp.replace(target)
        except httpx.HTTPError as exc:
            raise ServiceError(f"download failed: {exc}") from exc
        return target

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """Every event of the job until `end`; reconnects after a dropped connection,
        resuming after the last event received (no gap, no duplicate)."""
        for sse in self._stream(f"/v1/jobs/{job_id}/events", last_event_id):
            if sse.event == "end":
                yield Event(sse.id or "", "end", None, None, json.loads(sse.data))
            else:
                entry = StreamEntry.model_validate_json(sse.data)
                yield Event(sse.id, entry.type, entry.attempt, entry.step, entry.data)

    # --------------------------------------------------------------------------- studies
    def submit_study(self, body: dict[str, Any]) -> dict[str, Any]:
        """Start a study (the body of POST /v1/studies); the service answers at once."""
        return self._call("POST", "/v1/studies", json=body).json()

    def study(self, study_id: str) -> dict[str, Any]:
        """A study with its leaderboard (`trials`), best parameters, importances, verdict."""
        return self._call("GET", f"/v1/studies/{study_id}").json()

    def cancel_study(self, study_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/studies/{study_id}/cancel").json()

    def study_events(
        self, study_id: str, last_event_id: str | None = None
    ) -> Iterator[StudyStreamEvent]:
        """Every event of the study (`state`, `trial`, `best`) until `end`, reconnecting
        like `events`."""
        for sse in self._stream(f"/v1/studies/{study_id}/events", last_event_id):
            body = json.loads(sse.data)
            if sse.event == "end":
                yield StudyStreamEvent(sse.id or "", "end", None, body)
            else:
                yield StudyStreamEvent(sse.id, body["type"], body.get("time"), body["data"])

    # --------------------------------------------------------------------------- streams
    def _stream(self, path: str, last_event_id: str | None = None) -> Iterator[ServerSentEvent]:
        """The messages of an event stream (keep-alives left out) until `end`, which is the
        last one. After a dropped connection, or an `error` event (the service lost its
        Redis), it reconnects with `Last-Event-ID`, resuming after the last message received
        (no gap, no duplicate), and waits through 503s; gives up after 5 failed attempts in a
        row. Any other HTTP error from the service is a `ServiceError`."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    path,
                    headers=headers,
                    timeout=httpx.Timeout(30.0, read=None),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        error = ServiceError(_explain(source.response), source.response.status_code)
                        if source.response.status_code == 503:  # Redis is away: try again
                            raise _Reconnect(error)
                        raise error
                    for sse in source.iter_sse():
                        if sse.event == "error":  # the service lost its Redis mid-stream
                            detail = json.loads(sse.data or "{}").get("detail", "stream error")
                            raise _Reconnect(ServiceError(str(detail), 503))
                        failures = 0
                        if sse.event == "end":
                            yield sse
                            return
                        if sse.id:
                            last_event_id = sse.id
                        if not sse.data:  # a keep-alive comment
                            continue
                        yield sse
            except (httpx.HTTPError, _Reconnect) as exc:
                failures += 1
                if failures > 5:
                    if isinstance(exc, _Reconnect):
                        raise exc.error from None
                    raise ServiceError(f"event stream lost: {exc}") from exc
                time.sleep(min(2.0**failures * 0.1, 3.0))
