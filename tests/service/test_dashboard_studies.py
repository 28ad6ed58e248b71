"""The dashboard's study pages in a real browser (Debian's chromium, driven by Playwright)
against the real service: submit a small study from the form, follow it live to its verdict,
sort the leaderboard, open a trial's job; cancel a running study from its page. Screenshots go
to test-artifacts/ (kept by CI as artifacts)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from playwright.sync_api import Browser, Page

from tests.service import test_dashboard as dashboard
from tests.service.conftest import KEYS
from tests.service.test_studies import TERMINAL, base_config, study_body, wait_study

# the dashboard tests' fixtures (a chromium per module; a page with alice's key) and skip mark
browser = dashboard.browser
page = dashboard.page
pytestmark = dashboard.pytestmark
shot = dashboard.shot
MINUS = "\u2212"  # how the page writes a negative number


def number(text: str) -> float:
    """A number as the page writes it (a real minus sign, `±` for zero, a unit)."""
    return float(text.replace(MINUS, "-").replace("±", "").replace("%", "").strip())


def column(page: Page, col: str) -> list[str]:
    return [
        c.strip()
        for c in page.locator(f'#leaderboard tbody td[data-col="{col}"]').all_inner_texts()
    ]


def test_submit_a_study_and_read_its_leaderboard_and_verdict(
    page: Page, client: httpx.Client
) -> None:
    p = page
    p.click("#nav-studies")
    p.wait_for_selector("#studies")
    p.click("#new-study")
    p.wait_for_url("**/#/studies/new")
    example = json.loads(p.input_value("#study-body"))
    assert example["base"]["data"]["kind"] == "dummy" and example["search_space"]

    # an invalid search path: the error names its field, beside it in the body
    bad = study_body()
    bad["search_space"][0]["path"] = "optimizer.nope"
    p.fill("#study-body", json.dumps(bad, indent=2))
    p.click("#study-submit")
    p.wait_for_selector('#study-errors li[data-loc="search_space.0.path"]')
    assert '"path": "optimizer.nope"' in p.inner_text("#study-errors .err-line")

    body = study_body(name="from the browser", budget={"trials": 2, "parallel": 1})
    p.fill("#study-body", json.dumps(body, indent=2))
    p.click("#study-submit")
    p.wait_for_url("**/#/studies/study_*")
    sid = p.url.rsplit("/", 1)[1]
    # live: the first trial appears while it trains, then the study ends
    p.wait_for_selector("#leaderboard tbody tr[data-trial]", timeout=60_000)
    assert wait_study(client, sid, TERMINAL, timeout=240)["state"] == "succeeded"
    p.wait_for_function(
        "document.querySelector('#study-state')?.textContent === 'succeeded'", timeout=30_000
    )
    p.wait_for_selector("#verdict-table")
    api = client.get(f"/v1/studies/{sid}").json()
    search = [t for t in api["trials"] if t["kind"] == "search"]
    baselines = [t for t in api["trials"] if t["kind"] == "baseline"]
    assert len(search) == 2 and len(baselines) == 3

    # the leaderboard is the API's, in its order (best first), values to 3 decimals
    rows = p.locator("#leaderboard tbody tr")
    assert rows.count() == len(search)
    assert [int(r.get_attribute("data-trial") or -1) for r in rows.all()] == [
        t["number"] for t in search
    ]
    assert column(p, "value") == [f"{t['value']:.3f}" for t in search]
    assert column(p, "state") == [t["state"] for t in search]
    assert column(p, "param:weighting.name") == [t["params"]["weighting.name"] for t in search]
    lrs = [float(x) for x in column(p, "param:optimizer.lr")]
    assert lrs == [float(f"{t['params']['optimizer.lr']:.4g}") for t in search]
    assert p.inner_text(
        f'#leaderboard tr[data-trial="{api["best_trial"]}"] td[data-col="number"]'
    ).endswith("★")
    for t in baselines:
        cell = f'#baselines tr[data-baseline="{t["baseline"]}"] td[data-col="value"]'
        assert p.inner_text(cell) == f"{t['value']:.3f}"

    # sorting: by value, ascending then descending; by trial number; by a parameter
    p.click('#leaderboard th[data-sort="value"]')
    values = [float(v) for v in column(p, "value")]
    assert values == sorted(values)
    assert p.get_attribute('#leaderboard th[data-sort="value"]', "aria-sort") == "ascending"
    p.click('#leaderboard th[data-sort="value"]')
    assert [float(v) for v in column(p, "value")] == sorted(values, reverse=True)
    p.click('#leaderboard th[data-sort="number"]')
    assert [int(n.rstrip(" ★")) for n in column(p, "number")] == sorted(t["number"] for t in search)
    p.click('#leaderboard th[data-sort="param:weighting.name"]')
    names = column(p, "param:weighting.name")
    assert names == sorted(names)

    # the verdict: both tasks with the API's numbers, and Δ_MTL with its sign
    verdict = api["verdict"]
    assert p.locator("#verdict-table tbody tr").count() == 2
    for task in ("task_a", "task_b"):
        for key in ("multi_task", "single_task", "difference", "sum"):
            shown = p.inner_text(f'#verdict-table td[data-task="{task}"][data-col="{key}"]')
            assert abs(number(shown) - verdict["tasks"][task][key]) <= 0.0005 + 1e-9, (task, key)
    diff = verdict["tasks"]["task_a"]["difference"]
    sign = p.inner_text('#verdict-table td[data-task="task_a"][data-col="difference"]')[0]
    assert sign == ("+" if diff > 0 else MINUS if diff < 0 else "±")
    delta = p.inner_text("#delta-mtl")
    assert abs(number(delta) - verdict["delta_mtl"]) <= 0.005 + 1e-9 and delta.endswith("%")
    assert delta[0] == (
        "+" if verdict["delta_mtl"] > 0 else MINUS if verdict["delta_mtl"] < 0 else "±"
    )

    # the chart: a point per completed trial; the importances: a bar per parameter (or a note)
    points = p.get_attribute('[data-chart="objective by trial"]', "data-points")
    assert points == str(len(search))
    if api["importances"]:
        assert p.locator("#importances .imp").count() == len(api["importances"])
    p.wait_for_timeout(300)  # the chart's resize
    shot(p, "dashboard-study")
    p.screenshot(path="/tmp/dashboard-study.png", full_page=True)

    # a trial's job link opens its job page, which links back to the study
    first = search[0]
    p.click(f'#leaderboard tr[data-trial="{first["number"]}"] a.trial-job')
    p.wait_for_url(f"**/#/jobs/{first['jobs'][0]}")
    p.wait_for_function(
        "document.querySelector('#job-state')?.textContent === 'succeeded'", timeout=30_000
    )
    assert p.inner_text("#job-study") == sid

    # the studies list
    p.click("#nav-studies")
    p.wait_for_selector(f'#studies tr[data-study="{sid}"] .state.succeeded')
    row = p.inner_text(f'#studies tr[data-study="{sid}"]')
    assert "from the browser" in row and "2/2" in row and f"{api['best_value']:.3f}" in row
    shot(p, "dashboard-studies")

    # the study pages under the app's strict Content-Security-Policy: no violation
    assert pages_under_the_policy(p.context.browser, p.url.split("#")[0], sid) == []


def pages_under_the_policy(browser: Browser | None, base: str, sid: str) -> list[str]:
    """The studies list, the submit form and a finished study's page rendered with the CSP
    enforced (the `page` fixture bypasses it for Playwright's own scripts): the violations."""
    assert browser is not None
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    violations: list[str] = []
    page = context.new_page()
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => console.error("
        "'Content Security Policy: ' + e.violatedDirective + ' ' + e.blockedURI));"
    )
    try:
        page.goto(base)
        page.fill("#api-key", KEYS["alice"])
        page.press("#api-key", "Enter")
        page.goto(f"{base}#/studies")
        page.locator(f'#studies tr[data-study="{sid}"]').wait_for()
        page.goto(f"{base}#/studies/new")
        page.locator("#study-body").wait_for()
        page.goto(f"{base}#/studies/{sid}")
        page.locator("#verdict-table").wait_for()
        page.locator('[data-chart="objective by trial"] .uplot').wait_for()
        page.locator("#leaderboard a.trial-job").first.wait_for()
    finally:
        context.close()
    return violations


def test_cancel_a_running_study_from_its_page(page: Page, client: httpx.Client) -> None:
    slow = base_config(max_steps=3000, eval_every=50, log_every=5)
    slow["data"]["num_samples"] = 4096
    slow["batch_size"] = 8
    body: dict[str, Any] = study_body(base=slow, budget={"trials": 3, "parallel": 1})
    sid = client.post("/v1/studies", json=body).json()["id"]
    p = page
    p.goto(p.url.split("#")[0] + f"#/studies/{sid}")
    p.wait_for_selector(
        '#leaderboard tbody tr[data-trial="0"] td[data-col="state"] .running', timeout=60_000
    )
    deadline = time.monotonic() + 60
    while True:  # the trial's job trains
        job_id = client.get(f"/v1/studies/{sid}").json()["trials"][0]["jobs"][0]
        if client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 3:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    p.click("#study-cancel")
    p.wait_for_function(
        "document.querySelector('#study-state')?.textContent === 'cancelled'", timeout=60_000
    )
    assert client.get(f"/v1/studies/{sid}").json()["state"] == "cancelled"
    assert p.is_disabled("#study-cancel")
    assert column(p, "state") == ["cancelled"]
    assert p.locator("#activity li", has_text="study cancelled").count() == 1
