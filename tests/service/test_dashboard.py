"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against the real
service: submit a job from the form, watch its charts grow, cancel a job, see states change.
Screenshots go to test-artifacts/ (kept by CI as artifacts)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.service.conftest import KEYS, long_config, submit, wait_for, wait_step

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

#: How many steps the task_a loss chart shows (a JS expression for wait_for_function).
LOSS_POINTS = "Number(document.querySelector('[data-chart=\"task_a: loss\"]')?.dataset.points || 0)"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (the README's test command installs it)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, service: str) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
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


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def points(page: Page, title: str) -> int:
    value = page.get_attribute(f'[data-chart="{title}"]', "data-points")
    return int(value or 0)


def test_submit_from_the_form_and_watch_the_charts_grow(page: Page, client: httpx.Client) -> None:
    p = page
    p.goto(p.url.split("#")[0] + "#/submit")
    p.wait_for_function("document.querySelector('#config').value.includes('task_a')")
    config = p.input_value("#config")

    # An invalid value: the error is shown next to the field it names.
    p.fill("#config", config.replace('"num_classes": 5', '"num_classes": 1'))
    p.click("#validate")
    p.wait_for_selector(".err-msg")
    annotated = p.inner_text(".err-line")
    assert '"num_classes": 1' in annotated and "tasks.0.num_classes" in annotated
    shot(p, "dashboard-submit-error")

    slow = config.replace('"epochs": 2', '"epochs": 12')
    assert slow != config
    p.fill("#config", slow)
    p.fill("#job-name", "from the browser")
    p.click("#validate")
    p.wait_for_selector("#valid")
    p.click("#submit")
    p.wait_for_url("**/#/jobs/*")
    job_id = p.url.rsplit("/", 1)[1]

    p.wait_for_function(
        f"{LOSS_POINTS} >= 2",
        timeout=90_000,
    )
    first = points(p, "task_a: loss")
    p.wait_for_function(
        f"{LOSS_POINTS} > {first + 2}",
        timeout=90_000,
    )
    assert points(p, "task_b: accuracy") > 0
    assert points(p, "task weights") > 0
    shot(p, "dashboard-job-running")

    job = wait_for(client, job_id, {"succeeded"}, timeout=180)
    p.wait_for_function(
        "document.querySelector('#job-state')?.textContent === 'succeeded'", timeout=30_000
    )
    p.wait_for_selector('[data-cm="task_a"] table')
    assert points(p, "task_a: macro-F1") >= job["progress"]["step"] // 5 - 1
    assert p.is_enabled("#download")
    p.fill("#predict-texts", "a first text\na second text")
    p.click("#predict")
    p.wait_for_selector("#predict-out table")
    rows = p.locator("#predict-out tr").count()
    assert rows == 3  # header + one row per text
    shot(p, "dashboard-job-succeeded")

    p.goto(p.url.split("#")[0] + "#/")
    p.wait_for_selector(f'tr[data-job="{job_id}"] .state.succeeded')
    shot(p, "dashboard-jobs")


def test_cancel_a_running_job_from_its_page(page: Page, client: httpx.Client) -> None:
    job = submit(client, long_config(steps=2000))
    wait_step(client, job["id"], 5, timeout=120)
    p = page
    p.goto(p.url.split("#")[0] + f"#/jobs/{job['id']}")
    p.wait_for_function(
        "document.querySelector('#job-state')?.textContent === 'running'", timeout=30_000
    )
    p.click("#cancel")
    p.wait_for_function(
        "document.querySelector('#job-state')?.textContent === 'cancelled'", timeout=30_000
    )
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    assert p.is_disabled("#cancel")
    shot(p, "dashboard-job-cancelled")
