"""The playground (`/`, server/static/) in a real headless Chromium against a real vpt-serve.

Debian's `chromium` is driven by Playwright for Python (`executable_path`, so Playwright downloads no
browser of its own). The page loads without a key, the key is typed in, the tenant's tasks are listed,
an artifact is uploaded through the form, an image is classified and its top-k labels and score bars
are rendered; the result must equal the SDK's for the same image. A screenshot is written to
test-output/playground.png.

Without Chromium or Playwright the test fails (it is part of CI, which installs both), naming what to
install.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from clients.client import Client

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("VPT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[2] / "test-output" / "playground.png"
ANIMALS = ["tabby cat", "golden retriever", "red fox", "barn owl", "koala", "hedgehog"]


def picture() -> bytes:
    """A 96x96 PNG with some structure (a gradient and a disc), so the preview reads as an image."""
    img = Image.new("RGB", (96, 96))
    px = img.load()
    for y in range(96):
        for x in range(96):
            inside = (x - 60) ** 2 + (y - 40) ** 2 < 22**2
            px[x, y] = (230, 160, 40) if inside else (40 + x, 90 + y // 2, 200 - y)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def chromium(args: list[str]) -> Iterator[Any]:
    """Headless Chromium (Debian's) under Playwright with `args`, for a module-scoped fixture; the
    test fails with what to install when Playwright or Chromium is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is not installed: pip install 'playwright>=1.40' (test extra)")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: apt-get install -y chromium (or set VPT_TEST_CHROMIUM)"
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def browser():
    yield from chromium(CHROMIUM_ARGS)


def test_playground_routes_leave_the_api_alone(live):
    page = httpx.get(f"{live.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "vpt-serve" in page.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = httpx.get(live.url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    assert httpx.get(f"{live.url}/v1/tasks").status_code == 401  # the API still wants a key
    assert httpx.get(f"{live.url}/docs").status_code == 200
    assert httpx.get(f"{live.url}/metrics").status_code == 401  # every tenant's traffic: admins only
    admin = {"authorization": f"Bearer {live.keys['root']}"}
    assert httpx.get(f"{live.url}/metrics", headers=admin).text.startswith("#")
    assert httpx.get(f"{live.url}/static/%2e%2e/app.py").status_code == 404
    assert "/" not in httpx.get(f"{live.url}/openapi.json").json()["paths"]


def test_playground_lists_uploads_and_classifies(live, browser, tmp_path):
    key = live.keys["gallery"]
    img = picture()
    with Client(live.url, key) as sdk:
        sdk.upload("animals", live.artifact(seed=21, P=4, C=6, labels=ANIMALS))
        expected = sdk.classify("animals", img, top_k=5).predictions[0]
    (tmp_path / "birds.safetensors").write_bytes(live.artifact(seed=22, mode="shallow", C=3))
    (tmp_path / "photo.png").write_bytes(img)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG, but no more of one")

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    try:
        page.goto(f"{live.url}/")  # no key yet: the page loads, the API says 401
        page.wait_for_selector("#status.warn")
        assert page.text_content("#status") == "enter an API key"
        assert page.is_hidden("#message")

        page.fill("#api-key", "vpt_wrong")  # a wrong key: the API's error is shown
        page.click("#connect")
        page.wait_for_selector("#status.error")
        assert page.text_content("#status") == "invalid key"
        assert page.text_content("#message") == "401 unauthorized: invalid API key"
        assert all("status of 401" in p for p in problems)  # Chromium logs the refused fetch
        problems.clear()

        page.fill("#api-key", key)
        page.click("#connect")
        page.wait_for_selector("#status.ok")
        assert page.evaluate("localStorage.getItem('vpt.apiKey')") == key
        assert "random:vit_test_tiny@0" in page.text_content("#info")
        assert page.locator("#tasks .task-title").all_text_contents() == ["animals"]

        # Upload through the form: the new task appears in the list.
        page.fill("#upload-task", "birds")
        page.set_input_files("#upload-file", str(tmp_path / "birds.safetensors"))
        page.click("#upload")
        page.wait_for_selector("#upload-result.ok")
        assert page.text_content("#upload-result").startswith("Created gallery/birds: v")
        page.wait_for_function("document.querySelectorAll('#tasks .task').length === 2")
        assert page.text_content("#status").endswith("· 2 task(s)")

        # Pick `animals`, choose an image: five labels with score bars, best first, as the SDK says.
        page.click("#tasks .task[data-task='animals']")
        assert page.get_attribute("#tasks .task[data-task='animals']", "aria-pressed") == "true"
        page.set_input_files("#image-file", str(tmp_path / "photo.png"))
        page.wait_for_selector("#result:not([hidden]) .prediction")
        rows = page.locator("#predictions .prediction")
        assert rows.count() == 5
        assert rows.locator(".label").all_text_contents() == [p.label for p in expected]
        assert rows.locator(".score").all_text_contents() == [f"{100 * p.score:.1f}%" for p in expected]
        bar = rows.nth(0).locator(".bar").bounding_box()
        fill = rows.nth(0).locator(".fill").bounding_box()
        assert bar and fill and fill["width"] == pytest.approx(bar["width"] * expected[0].score, abs=2)
        latency = page.text_content("#latency")
        assert "ms round trip" in latency and "animals v" in latency

        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # Not an image: a sentence (not "415 unsupported_media_type: Content-Type 'text/plain' ..."),
        # and no broken preview or earlier predictions left on the page.
        page.set_input_files("#image-file", str(tmp_path / "notes.txt"))
        page.wait_for_selector("#message.error")
        assert (
            page.text_content("#message")
            == "That file is not an image (JPEG, PNG, WebP, GIF or BMP): notes.txt"
        )
        assert page.is_hidden("#preview") and page.get_attribute("#preview", "src") is None
        assert page.is_hidden("#result") and page.is_hidden("#image-name")
        # An image type the server cannot decode: its reason, in a sentence, and the preview cleared.
        page.set_input_files("#image-file", str(tmp_path / "photo.png"))
        page.wait_for_selector("#result:not([hidden]) .prediction")
        page.set_input_files("#image-file", str(tmp_path / "broken.png"))
        page.wait_for_function("document.querySelector('#result').hidden")
        assert page.text_content("#message") == (
            "Could not use broken.png: unrecognised image format (send JPEG, PNG, WebP, GIF or BMP)"
        )
        assert page.is_hidden("#preview") and page.get_attribute("#preview", "src") is None
        assert all("status of 400" in p for p in problems)  # Chromium logs the refused request
        problems.clear()
        page.set_input_files("#image-file", str(tmp_path / "photo.png"))  # and a good one works again
        page.wait_for_selector("#result:not([hidden]) .prediction")
        assert page.is_visible("#preview")

        # The key survives a reload (localStorage): the page reconnects by itself.
        page.reload()
        page.wait_for_selector("#status.ok")
        assert page.input_value("#api-key") == key
    finally:
        page.close()
    assert problems == []
