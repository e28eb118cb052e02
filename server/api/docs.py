"""GET /docs (Swagger UI) and /redoc (ReDoc), with their scripts and styles served by this server.

FastAPI's own pages load Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google), so on a
network without the internet they are blank. These are the same pages (FastAPI's `get_swagger_ui_html`
and `get_redoc_html`) pointed at files under /docs/assets, as FastAPI's "Custom Docs UI Static Assets
(Self-Hosting)" guide describes. The files come from the `fastapi-offline` package (MIT), which ships
the builds of Swagger UI (Apache-2.0, SmartBear Software) and ReDoc (MIT, Redocly) and follows their
releases; only its `static/` folder is used, not its app factory.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"  # outside /v1: the pages load before anyone has typed a key
ASSETS_PACKAGE = ("fastapi_offline", "static")  # (package, folder in it) for StaticFiles
ASSET_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# ReDoc's sidebar always shows Redocly's logo from Redocly's CDN (hidden when it fails to load). Both
# pages may show images from here only, so an offline browser does not even try another host.
IMAGES_FROM_HERE = {"Content-Security-Policy": "img-src 'self' data:"}


def install_docs(app: FastAPI) -> None:
    """Adds /docs, its OAuth2 redirect page, /redoc and /docs/assets/* to an app built with
    `docs_url=None, redoc_url=None` (so FastAPI's CDN pages are not there to shadow these)."""
    assert app.docs_url is None and app.redoc_url is None, "build the app with docs_url=None, redoc_url=None"
    openapi_url, redirect_url = app.openapi_url, app.swagger_ui_oauth2_redirect_url
    assert openapi_url is not None and redirect_url is not None
    # StaticFiles checks the folder now: a `fastapi-offline` without it fails at start-up, not as a
    # blank page.
    assets = StaticFiles(packages=[ASSETS_PACKAGE])
    missing = [name for name in ASSET_FILES if assets.lookup_path(name)[1] is None]
    if missing:  # a broken install: refuse to start rather than serve blank pages (not an assert: -O)
        raise RuntimeError(f"fastapi-offline ships no static/{', static/'.join(missing)}: reinstall it")
    app.mount(ASSETS_URL, assets, name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        page = get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=root + redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        page.headers.update(IMAGES_FROM_HERE)
        return page

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        page = get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,  # ReDoc falls back to the browser's own fonts
        )
        page.headers.update(IMAGES_FROM_HERE)
        return page


def _root_path(request: Request) -> str:
    """The prefix the app is served under (`uvicorn --root-path`, a proxy's path), as FastAPI's own
    pages use it: the browser asks for the assets by their full path."""
    return request.scope.get("root_path", "").rstrip("/")
