"""The in-process fan-out buffer of a job's events (no Redis needed)."""

from __future__ import annotations

import json
from typing import Any

from app.core.events import JobHub, parse_id


def entry(ms: int, type_: str, attempt: int, step: int, data: Any = None) -> tuple[str, dict]:
    event = {"type": type_, "attempt": attempt, "step": step, "time": 0, "data": data or {}}
    return f"{ms}-0", {"t": type_, "a": str(attempt), "s": str(step), "e": json.dumps(event)}


def hub(buffer_size: int = 2000) -> JobHub:
    return JobHub(store=None, job_id="j", block_ms=1000, buffer_size=buffer_size)  # type: ignore[arg-type]


def test_after_and_coverage() -> None:
    h = hub()
    h.start = parse_id("100-0")
    h._add([entry(101, "log", 1, 5), entry(102, "log", 1, 10)])
    assert h.after(parse_id("99-5")) is None  # older than what the hub saw: read Redis
    assert [e[0] for e in h.after(parse_id("100-0"))] == ["101-0", "102-0"]
    assert [e[0] for e in h.after(parse_id("101-0"))] == ["102-0"]
    assert h.after(parse_id("102-0")) == []
    assert not h.done
    h._add([entry(103, "state", 1, 10, {"state": "succeeded"})])
    assert h.done


def test_trim_moves_the_start() -> None:
    h = hub(buffer_size=8)
    h._add([entry(i, "log", 1, i) for i in range(1, 12)])
    assert len(h.entries) == 8
    assert h.start == parse_id("3-0")
    assert h.after(parse_id("2-0")) is None
    assert h.after(parse_id("3-0"))[0][0] == "4-0"  # type: ignore[index]


def test_resume_prunes_like_redis() -> None:
    h = hub()
    h._add([entry(i, "log", 1, i * 5) for i in range(1, 7)])  # steps 5..30
    h._add([entry(10, "state", 2, 30, {"state": "queued"})])
    h._add([entry(11, "resume", 2, 20, {"from_step": 20})])
    steps = [(f["t"], int(f["a"]), int(f["s"])) for _, f in h.entries]
    assert steps == [
        ("log", 1, 5), ("log", 1, 10), ("log", 1, 15), ("log", 1, 20),
        ("state", 2, 30), ("resume", 2, 20),
    ]  # fmt: skip
    assert h.ids == sorted(h.ids)
