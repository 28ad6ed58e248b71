"""A worker killed with SIGKILL mid-job: the next worker resumes from the last checkpoint."""

from __future__ import annotations

import time

import httpx

from tests.service.conftest import WorkerHandle, long_config, read_sse, submit, wait_for


def test_sigkill_mid_job_resumes_from_checkpoint(
    client: httpx.Client, worker: WorkerHandle
) -> None:
    total, every = 500, 50
    cfg = long_config(steps=total, checkpoint_every=every)
    job = submit(client, cfg)
    job_id = job["id"]
    # wait for a checkpoint and some progress past it (steps that the resume must replace)
    deadline = time.monotonic() + 120
    while True:
        state = client.get(f"/v1/jobs/{job_id}").json()
        ckpt = state["checkpoint_step"] or 0
        if ckpt >= 2 * every and state["progress"]["step"] >= ckpt + 15:
            break
        assert state["state"] in ("queued", "running"), state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)
    worker.kill()
    killed_at = client.get(f"/v1/jobs/{job_id}").json()
    assert killed_at["state"] == "running"  # nobody has noticed yet
    reported_past_ckpt = killed_at["progress"]["step"]

    worker.start()  # a new worker; its reaper finds the expired lease
    final = wait_for(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=180)
    assert final["state"] == "succeeded", (final, worker.log_text()[-3000:])
    assert final["attempt"] == 2 and final["restarts"] == 1
    assert final["progress"]["step"] == total

    events, _ = read_sse(client, job_id)
    states = [(e["data"]["attempt"], e["data"]["data"]["state"]) for e in events
              if e.get("event") == "state"]  # fmt: skip
    assert states == [(1, "queued"), (1, "running"), (2, "queued"), (2, "running"),
                      (2, "succeeded")]  # fmt: skip
    requeue = next(e for e in events if e.get("event") == "state" and e["data"]["attempt"] == 2)
    assert "lease expired" in requeue["data"]["data"]["reason"]
    resume = next(e for e in events if e.get("event") == "resume")
    from_step = resume["data"]["data"]["from_step"]
    assert 2 * every <= from_step <= reported_past_ckpt and from_step % every == 0
    assert resume["data"]["data"]["metrics_dropped"] > 0  # attempt 1 had logged past it

    # no step appears twice: in the metric history ...
    history = client.get(f"/v1/jobs/{job_id}/metrics").json()["items"]
    logs = [(m["step"], m["attempt"]) for m in history if m["type"] == "log"]
    assert [s for s, _ in logs] == list(range(5, total + 1, 5))
    assert all(a == (1 if s <= from_step else 2) for s, a in logs)
    evals = [m["step"] for m in history if m["type"] == "evaluate"]
    assert evals == list(range(every, total + 1, every))
    # ... nor in the event stream a client reads from the start
    log_steps = [e["data"]["step"] for e in events if e.get("event") == "log"]
    assert log_steps == list(range(5, total + 1, 5))
