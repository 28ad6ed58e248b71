"""`/docs` (Swagger UI) and `/redoc` (ReDoc), with their scripts and styles served by the app
itself: no CDN, so the pages work on a host without internet access.

The assets come from the `fastapi-offline` package (Swagger UI 5 and ReDoc 2 builds) and are
served under `/docs/assets/`; the app is created with `docs_url=None, redoc_url=None` so that
FastAPI's CDN-based pages are not registered.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response

from app.core.headers import docs_csp

__all__ = ["ASSETS_URL", "router"]

router = APIRouter(include_in_schema=False)

#: Where the assets are served (under /docs, clear of the dashboard's /static mount).
ASSETS_URL = "/docs/assets"
_ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
#: The files the pages use, by name (nothing else in the package folder is served).
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
#: ReDoc's sidebar badge loads its logo from Redocly's CDN (no option turns it off); with an
#: empty `src` the image fails at once, ReDoc drops it and keeps the text link.
_REDOC_CDN_LOGO = b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"'
try:  # a query string that changes with the package, so long caching stays correct
    _VERSION = version("fastapi-offline")
except PackageNotFoundError:  # pragma: no cover - imported above, so installed
    _VERSION = "0"


def _asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}?v={_VERSION}"


def _openapi_url(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{request.app.openapi_url}"


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    # validatorUrl: none, or Swagger UI would ask validator.swagger.io about a non-local spec
    parameters: dict[str, Any] = {**(app.swagger_ui_parameters or {}), "validatorUrl": None}
    return _with_csp(
        get_swagger_ui_html(
            openapi_url=_openapi_url(request),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=_asset(request, "swagger-ui-bundle.js"),
            swagger_css_url=_asset(request, "swagger-ui.css"),
            swagger_favicon_url=_asset(request, "favicon.png"),
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=parameters,
        )
    )


@router.get("/docs/oauth2-redirect", response_class=HTMLResponse)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return _with_csp(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    return _with_csp(
        get_redoc_html(
            openapi_url=_openapi_url(request),
            title=f"{request.app.title} - ReDoc",
            redoc_js_url=_asset(request, "redoc.standalone.js"),
            redoc_favicon_url=_asset(request, "favicon.png"),
            with_google_fonts=False,
        )
    )


def _with_csp(page: HTMLResponse) -> HTMLResponse:
    """The page with its own Content-Security-Policy: its inline start-up script allowed by
    hash (the app's strict policy would block it)."""
    page.headers["Content-Security-Policy"] = docs_csp(bytes(page.body).decode())
    return page


@cache
def _asset_bytes(name: str) -> bytes:
    data = (_ASSETS_DIR / name).read_bytes()
    if name == "redoc.standalone.js":
        data = data.replace(_REDOC_CDN_LOGO, b'src:""')
    return data


@router.get(ASSETS_URL + "/{name}")
async def asset(name: str) -> Response:
    media_type = _ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, "Not Found")
    return Response(
        _asset_bytes(name),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400"},
    )
