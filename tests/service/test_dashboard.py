"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against the real
service: submit a job from the form, watch its charts grow, cancel a job, see states change.
Screenshots go to test-artifacts/ (kept by CI as artifacts)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import KEYS, long_config, submit, wait_for, wait_step

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (the README's test command installs it)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: object, service: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{service}/")
    page.fill("#api-key", KEYS["alice"])
    page.press("#api-key", "Enter")  # commits the field: a `change` event
    page.wait_for_function(f"localStorage.getItem('mtl-api-key') === '{KEYS['alice']}'")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: object, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def points(page: object, title: str) -> int:
    value = page.get_attribute(f'[data-chart="{title}"]', "data-points")  # type: ignore[attr-defined]
    return int(value or 0)


def test_submit_from_the_form_and_watch_the_charts_grow(page: object, client: httpx.Client) -> None:
    p = page
    p.goto(p.url.split("#")[0] + "#/submit")  # type: ignore[attr-defined]
    p.wait_for_function("document.querySelector('#config').value.includes('task_a')")  # type: ignore[attr-defined]
    config = p.input_value("#config")  # type: ignore[attr-defined]

    # An invalid value: the error is shown next to the field it names.
    p.fill("#config", config.replace('"num_classes": 5', '"num_classes": 1'))  # type: ignore[attr-defined]
    p.click("#validate")  # type: ignore[attr-defined]
    p.wait_for_selector(".err-msg")  # type: ignore[attr-defined]
    annotated = p.inner_text(".err-line")  # type: ignore[attr-defined]
    assert '"num_classes": 1' in annotated and "tasks.0.num_classes" in annotated
    shot(p, "dashboard-submit-error")

    slow = config.replace('"epochs": 2', '"epochs": 12')
    assert slow != config
    p.fill("#config", slow)  # type: ignore[attr-defined]
    p.fill("#job-name", "from the browser")  # type: ignore[attr-defined]
    p.click("#validate")  # type: ignore[attr-defined]
    p.wait_for_selector("#valid")  # type: ignore[attr-defined]
    p.click("#submit")  # type: ignore[attr-defined]
    p.wait_for_url("**/#/jobs/*")  # type: ignore[attr-defined]
    job_id = p.url.rsplit("/", 1)[1]  # type: ignore[attr-defined]

    p.wait_for_function(  # type: ignore[attr-defined]
        "Number(document.querySelector('[data-chart=\"task_a: loss\"]')?.dataset.points || 0) >= 2",
        timeout=90_000,
    )
    first = points(p, "task_a: loss")
    p.wait_for_function(  # type: ignore[attr-defined]
        f"Number(document.querySelector('[data-chart=\"task_a: loss\"]')?.dataset.points || 0) > {first + 2}",
        timeout=90_000,
    )
    assert points(p, "task_b: accuracy") > 0
    assert points(p, "task weights") > 0
    shot(p, "dashboard-job-running")

    job = wait_for(client, job_id, {"succeeded"}, timeout=180)
    p.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelector('#job-state')?.textContent === 'succeeded'", timeout=30_000
    )
    p.wait_for_selector('[data-cm="task_a"] table')  # type: ignore[attr-defined]
    assert points(p, "task_a: macro-F1") >= job["progress"]["step"] // 5 - 1
    assert p.is_enabled("#download")  # type: ignore[attr-defined]
    p.fill("#predict-texts", "a first text\na second text")  # type: ignore[attr-defined]
    p.click("#predict")  # type: ignore[attr-defined]
    p.wait_for_selector("#predict-out table")  # type: ignore[attr-defined]
    rows = p.locator("#predict-out tr").count()  # type: ignore[attr-defined]
    assert rows == 3  # header + one row per text
    shot(p, "dashboard-job-succeeded")

    p.goto(p.url.split("#")[0] + "#/")  # type: ignore[attr-defined]
    p.wait_for_selector(f'tr[data-job="{job_id}"] .state.succeeded')  # type: ignore[attr-defined]
    shot(p, "dashboard-jobs")


def test_cancel_a_running_job_from_its_page(page: object, client: httpx.Client) -> None:
    job = submit(client, long_config(steps=2000))
    wait_step(client, job["id"], 5, timeout=120)
    p = page
    p.goto(p.url.split("#")[0] + f"#/jobs/{job['id']}")  # type: ignore[attr-defined]
    p.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelector('#job-state')?.textContent === 'running'", timeout=30_000
    )
    p.click("#cancel")  # type: ignore[attr-defined]
    p.wait_for_function(  # type: ignore[attr-defined]
        "document.querySelector('#job-state')?.textContent === 'cancelled'", timeout=30_000
    )
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    assert p.is_disabled("#cancel")  # type: ignore[attr-defined]
    shot(p, "dashboard-job-cancelled")
