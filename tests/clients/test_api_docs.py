"""/docs (Swagger UI) and /redoc (ReDoc) work on a machine without the internet.

FastAPI's default pages load their scripts from a CDN and render nothing offline. Here a real headless
Chromium whose network is cut (every host name resolves to nothing but 127.0.0.1, and every request
that is not to the server is aborted and recorded) opens both pages from a real vpt-serve and must
find every operation of /openapi.json rendered. Over plain HTTP, every URL the two pages reference is
the server's own and is served by it, also under a root path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.clients.test_browser import CHROMIUM_ARGS, chromium
from tests.server.helpers import BACKBONE_SPEC

# Chromium resolves no host name but 127.0.0.1: a page that needs a CDN cannot reach one, whatever
# network the machine running the test has.
OFFLINE_ARGS = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
RENDER_TIMEOUT_MS = 20_000  # a busy 2-core machine parses the 1.5 MB bundle in ~1-3 s
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "test-output"


@pytest.fixture(scope="module")
def offline_browser():
    yield from chromium(OFFLINE_ARGS)


class OfflinePage:
    """A page in its own browser context whose requests may go to `origin` only; the others are
    aborted and kept in `elsewhere`, with uncaught page errors in `errors`."""

    def __init__(self, browser, origin: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.elsewhere: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self._origin = origin.rstrip("/") + "/"

    def _route(self, route) -> None:
        if route.request.url.startswith(self._origin):
            route.continue_()
        else:
            self.elsewhere.append(route.request.url)
            route.abort()

    def wait_for(self, selector: str, what: str) -> None:
        try:
            self.page.wait_for_selector(selector, timeout=RENDER_TIMEOUT_MS)
        except Exception as e:  # Playwright's TimeoutError: say why, not just "timeout"
            raise AssertionError(
                f"{what} rendered nothing offline (no {selector!r}); requests that left the server: "
                f"{self.elsewhere}; page errors: {self.errors}"
            ) from e


@pytest.fixture
def offline_page(live, offline_browser) -> Iterator[OfflinePage]:
    p = OfflinePage(offline_browser, live.url)
    try:
        yield p
    finally:
        p.context.close()


def operations(openapi: dict) -> set[tuple[str, str, str]]:
    """(METHOD, path, summary) of every operation /openapi.json describes."""
    return {
        (method.upper(), path, op["summary"])
        for path, ops in openapi["paths"].items()
        for method, op in ops.items()
    }


@pytest.mark.integration
def test_swagger_ui_renders_every_operation_offline(live, offline_page):
    expected = operations(httpx.get(f"{live.url}/openapi.json").json())
    assert len(expected) >= 8
    page = offline_page.page
    page.goto(f"{live.url}/docs")
    offline_page.wait_for(".opblock .opblock-summary-path", "Swagger UI")
    rendered = set()
    for block in page.locator(".opblock").all():
        method = block.locator(".opblock-summary-method").text_content()
        path = block.locator(".opblock-summary-path").get_attribute("data-path")
        summary = block.locator(".opblock-summary-description").text_content()
        rendered.add((method, path, summary))
    assert rendered == expected
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "docs-offline.png"))
    assert offline_page.elsewhere == [] and offline_page.errors == []


@pytest.mark.integration
def test_redoc_renders_every_operation_offline(live, offline_page):
    expected = operations(httpx.get(f"{live.url}/openapi.json").json())
    page = offline_page.page
    page.goto(f"{live.url}/redoc")
    # ReDoc gives each operation a section with its summary as the heading.
    offline_page.wait_for("[data-section-id^='operation/'] h2", "ReDoc")
    headings = page.locator("[data-section-id^='operation/'] h2").all_text_contents()
    assert sorted(h.strip() for h in headings) == sorted(summary for _, _, summary in expected)
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT_DIR / "redoc-offline.png"))
    assert offline_page.elsewhere == [] and offline_page.errors == []


class _References(HTMLParser):
    """Every src/href/spec-url in a page, and the spec URL in Swagger UI's inline script."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.urls += [v for k, v in attrs if k in ("src", "href", "spec-url") and v]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.urls += re.findall(r"\burl: '([^']+)'", data)


def references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


# What each referenced file must be served as, by its name's end.
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}


def _check_served(get, page: str, prefix: str = "") -> list[str]:
    """GETs `page` and every URL it references with `get`; all must be this server's, answered 200
    with their kind of content. Returns the URLs."""
    r = get(prefix + page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text
    assert "http://" not in r.text and "https://" not in r.text, f"{page} refers to another host"
    urls = references(r.text)
    assert any(u.endswith(".js") for u in urls), (page, urls)  # its UI is a script from here
    assert any(u.endswith("openapi.json") for u in urls), (page, urls)
    for url in urls:
        assert url.startswith(prefix + "/"), (page, url)
        asset = get(url)
        assert asset.status_code == 200 and asset.content, (page, url, asset.status_code)
        kind = next(v for k, v in CONTENT_TYPES.items() if url.endswith(k))
        assert kind in asset.headers["content-type"], (page, url, asset.headers["content-type"])
    return urls


@pytest.mark.integration
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_server(live, page):
    urls = _check_served(lambda path: httpx.get(live.url + path, timeout=10.0), page)
    assert any("/docs/assets/" in u for u in urls)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_follow_the_root_path(page):
    """Behind a proxy that serves the API under /vpt (`uvicorn --root-path /vpt`), the pages ask for
    /vpt/openapi.json and /vpt/docs/assets/*, and those are served."""
    app = create_app(Settings(backbone=BACKBONE_SPEC, store="unused", open_mode=True))
    client = TestClient(app, root_path="/vpt")  # no lifespan: the docs need no services
    _check_served(client.get, page, prefix="/vpt")
