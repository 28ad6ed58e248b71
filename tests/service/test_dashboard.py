"""The dashboard in a real browser (Debian's chromium, driven by Playwright) against the real
service: submit a job from the form, watch its charts grow, cancel a job, see states change;
the final scores of a finished job; Swagger UI and ReDoc with no network beyond the service.
Screenshots go to test-artifacts/ (kept by CI as artifacts)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route

from tests.service.conftest import KEYS, long_config, submit, wait_for, wait_step

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
EXAMPLE_JOB = ROOT / "app" / "examples" / "dummy_job.json"
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
    # bypass_csp: Playwright's own `wait_for_function("...")` evaluates strings in the page,
    # which the app's strict policy forbids; test_headers.py checks the pages under the policy
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, bypass_csp=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{service}/")
    page.fill("#api-key", KEYS["alice"])
    page.press("#api-key", "Enter")  # commits the field: a `change` event
    page.wait_for_function(f"sessionStorage.getItem('mtl-api-key') === '{KEYS['alice']}'")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page: Page, name: str, *, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


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

    slow = re.sub(r'"epochs": \d+', '"epochs": 12', config)
    assert '"epochs": 12' in slow
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


#: The width of `main`'s content box and of a chart's plot, in CSS pixels (a JS function).
CHART_RATIO = """(title) => {
  const main = document.querySelector('main'), style = getComputedStyle(main);
  const content = main.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const plot = document.querySelector(`[data-chart="${title}"] .uplot`);
  return plot ? plot.getBoundingClientRect().width / content : 0;
}"""


def content_width(page: Page) -> float:
    return float(
        page.evaluate(
            "(() => { const m = document.querySelector('main'), s = getComputedStyle(m);"
            " return m.clientWidth - parseFloat(s.paddingLeft) - parseFloat(s.paddingRight); })()"
        )
    )


def test_job_page_shows_final_scores_and_full_width_charts(
    page: Page, client: httpx.Client
) -> None:
    config = json.loads(EXAMPLE_JOB.read_text("utf-8"))
    job = wait_for(client, submit(client, config)["id"], {"succeeded"}, timeout=180)
    final = job["final_metrics"]
    assert final["validation"] is not None
    p = page
    p.goto(p.url.split("#")[0] + f"#/jobs/{job['id']}")
    p.wait_for_selector("#final-scores-table")
    p.wait_for_function(f"{LOSS_POINTS} > 0")

    # the table holds the API's numbers: a row per task and the mean, columns per split
    table = "#final-scores-table"
    checked = 0
    for split in ("validation", "test"):
        report = final.get(split)
        if report is None:  # dummy data has no test split: no test columns
            assert p.locator(f'{table} td[data-split="{split}"]').count() == 0
            continue
        assert p.locator(f"{table} thead th", has_text=split).count() == 1
        for task, values in {**report["tasks"], "mean": report["mean"]}.items():
            for metric in ("accuracy", "macro_f1", "weighted_f1"):
                cell = (
                    f'{table} td[data-split="{split}"][data-task="{task}"][data-metric="{metric}"]'
                )
                shown = float(p.inner_text(cell))
                assert abs(shown - values[metric]) <= 0.0005 + 1e-9, (split, task, metric)
                checked += 1
    assert checked == 9  # task_a, task_b and mean on validation
    assert p.locator(f"{table} tbody tr").count() == 3

    # every chart uses the page's width, and follows it when the window narrows
    titles = ["task_a: loss", "task_b: macro-F1", "task weights"]
    for width in (1400, 1000):
        p.set_viewport_size({"width": width, "height": 1000})
        for title in titles[:2]:
            p.wait_for_function(f"({CHART_RATIO})({json.dumps(title)}) >= 0.9", timeout=10_000)
            box = p.locator(f'[data-chart="{title}"] .uplot').bounding_box()
            assert box is not None
            content = content_width(p)
            assert 0.9 * content <= box["width"] <= content, (title, width, box, content)
        box = p.locator('[data-chart="task weights"] .uplot').bounding_box()
        assert box is not None and box["width"] >= 0.4 * content_width(p)
    p.set_viewport_size({"width": 1400, "height": 1000})
    p.wait_for_function(f"({CHART_RATIO})('task_a: loss') >= 0.9", timeout=10_000)
    shot(p, "dashboard-job-final-scores")


def test_api_docs_load_without_network(
    browser: Browser, service: str, client: httpx.Client
) -> None:
    """Swagger UI and ReDoc come from the app itself: with every request to another host
    aborted, both render, and "Try it out" submits the example job."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    outside: list[str] = []

    def only_the_service(route: Route) -> None:
        url = route.request.url
        if url.startswith(f"{service}/"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", only_the_service)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        p.goto(f"{service}/docs")
        post = p.locator(".opblock-post", has=p.locator('[data-path="/v1/jobs"]'))
        post.locator(".opblock-summary-path").wait_for(state="visible", timeout=30_000)
        assert post.locator(".opblock-summary-method").inner_text() == "POST"

        # "Try it out" with the example body, authorised with alice's key
        p.click("button.btn.authorize")
        p.fill(".modal-ux .auth-container input", KEYS["alice"])
        p.click(".modal-ux .auth-btn-wrapper button.authorize")
        p.click(".modal-ux button.btn-done")
        post.locator(".opblock-summary").click()
        post.locator("button.try-out__btn").click()
        body = post.locator("textarea.body-param__text")
        assert '"task_a"' in body.input_value()
        post.locator("button.execute").click()
        response = post.locator(".live-responses-table tr.response").first
        response.wait_for(timeout=30_000)
        assert response.locator(".response-col_status").inner_text().strip() == "202"
        answer = response.locator(".response-col_description").inner_text()
        job_id = re.search(r'"id":\s*"([\w-]+)"', answer)
        assert job_id, answer
        shot(p, "docs-swagger-ui-offline", full_page=False)
        wait_for(client, job_id[1], {"succeeded"}, timeout=180)

        p.goto(f"{service}/redoc")
        p.locator("h1", has_text="mtl-jobs").wait_for(state="visible", timeout=30_000)
        menu = p.locator(".menu-content")
        menu.locator('[role=menuitem][aria-label="jobs"] > label').click()  # open the tag
        submit_item = menu.locator('[role=menuitem][aria-label="Submit a training job"]')
        submit_item.wait_for(state="visible")
        p.locator("h2", has_text="Submit a training job").first.wait_for(state="visible")
        shot(p, "docs-redoc-offline", full_page=False)
    finally:
        context.close()
    assert outside == [], f"requests left the host: {outside}"
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_the_key_stays_in_the_tab_unless_remembered(browser: Browser, service: str) -> None:
    """The key is kept in the tab's sessionStorage, not localStorage: a new tab (a new
    context: nothing shared) asks again. "remember" keeps it in localStorage; unticking it
    forgets it there."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{service}/")
    page.fill("#api-key", KEYS["alice"])
    page.press("#api-key", "Enter")
    page.wait_for_selector("text=Jobs")
    stored = page.evaluate(
        "[sessionStorage.getItem('mtl-api-key'), localStorage.getItem('mtl-api-key')]"
    )
    assert stored == [KEYS["alice"], None]
    page.check("#remember-key")
    assert page.evaluate("localStorage.getItem('mtl-api-key')") == KEYS["alice"]
    page.reload()
    assert page.input_value("#api-key") == KEYS["alice"] and page.is_checked("#remember-key")
    page.uncheck("#remember-key")
    assert page.evaluate("localStorage.getItem('mtl-api-key')") is None
    context.close()
    fresh = browser.new_context()
    other = fresh.new_page()
    other.goto(f"{service}/")
    assert other.input_value("#api-key") == "" and not other.is_checked("#remember-key")
    fresh.close()
