"""Security headers on every response, and pages that work under them: the dashboard under a
strict Content-Security-Policy (no inline script), Swagger UI and ReDoc under theirs (their one
start-up script by hash), in a real browser with no policy violation."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser

from app.core.headers import STRICT_CSP
from tests.service.conftest import KEYS, auth

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_every_response_carries_the_security_headers(client: httpx.Client, service: str) -> None:
    responses = {
        "dashboard": httpx.get(f"{service}/"),
        "static": httpx.get(f"{service}/static/app.js"),
        "health": httpx.get(f"{service}/healthz"),
        "metrics": httpx.get(f"{service}/metrics"),
        "api 200": client.get("/v1/jobs"),
        "api 401": httpx.get(f"{service}/v1/jobs"),
        "api 404": client.get("/v1/jobs/job_00000000000000000000"),
        "api 422": client.post("/v1/jobs", json={"tasks": []}),
        "key in URL 400": httpx.get(f"{service}/v1/jobs", params={"token": "x"}),
        "openapi": httpx.get(f"{service}/openapi.json"),
        "docs": httpx.get(f"{service}/docs"),
        "redoc": httpx.get(f"{service}/redoc"),
    }
    for name, r in responses.items():
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert r.headers.get("referrer-policy") == "no-referrer", name
        assert r.headers.get("x-frame-options") == "DENY", name
        csp = r.headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, (name, csp)
        if name not in ("docs", "redoc"):
            assert csp == STRICT_CSP, name
    assert "'unsafe-inline'" not in STRICT_CSP and "script-src 'self';" in STRICT_CSP
    for name in ("docs", "redoc"):
        csp = responses[name].headers["content-security-policy"]
        script_src = csp.split("script-src ", 1)[1].split(";", 1)[0]
        assert "unsafe" not in script_src, script_src
        # Swagger UI starts from one inline script, allowed by its hash; ReDoc has none
        assert ("'sha256-" in script_src) == (name == "docs"), script_src
    with client.stream("GET", "/v1/jobs/job_00000000000000000000/events") as stream:
        assert stream.headers.get("x-content-type-options") == "nosniff"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_pages_render_with_no_policy_violation(browser: Browser, service: str) -> None:
    context = browser.new_context()
    violations: list[str] = []
    page = context.new_page()
    page.on(
        "console",
        lambda m: (
            violations.append(m.text)
            if "Content Security Policy" in m.text or "Refused to" in m.text
            else None
        ),
    )
    page.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => "
        "console.error('Refused to load (CSP): ' + e.violatedDirective + ' ' + e.blockedURI));"
    )
    try:
        page.goto(f"{service}/")
        page.fill("#api-key", KEYS["alice"])
        page.press("#api-key", "Enter")
        page.wait_for_selector("text=Jobs", timeout=20_000)
        page.goto(f"{service}/docs")
        page.locator(".opblock-summary-path").first.wait_for(state="visible", timeout=30_000)
        page.goto(f"{service}/redoc")
        page.locator("h1").first.wait_for(state="visible", timeout=30_000)
    finally:
        context.close()
    assert not violations, violations
    assert auth()  # (the key only ever travels in headers)
