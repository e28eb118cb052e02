"""SDK without a server: error mapping, retry policy, image encoding, typed results.

The transport is httpx.MockTransport (httpx's own test transport), standing in for the network only.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from clients import errors
from clients.client import AsyncClient, Client, RetryPolicy, _images
from clients.errors import parse_error

FAST = RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=0.01)
CLASSIFY_OK = {
    "task_id": "t",
    "version": 2,
    "predictions": [[{"label": "a", "index": 0, "score": 0.9}]],
    "timings": {"decode_ms": 1, "queue_ms": 1, "compute_ms": 1, "total_ms": 3, "batch_size": 4},
}


def err(status: int, type_: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": "boom"}}, headers=headers)


@pytest.mark.parametrize(("type_", "cls"), sorted(errors.ERRORS.items()))
def test_every_server_error_type_has_its_class(type_, cls):
    e = parse_error(418, {"error": {"type": type_, "message": "m"}})
    assert type(e) is cls and e.message == "m" and e.status == 418


def test_unknown_or_non_json_errors_fall_back_to_status():
    assert type(parse_error(404, "<html>")) is errors.NotFound
    assert type(parse_error(502, "bad gateway")) is errors.InternalError
    assert type(parse_error(400, {"error": {"type": "brand_new", "message": "x"}})) is errors.InvalidRequest
    assert parse_error(429, {}, "3").retry_after == 3.0
    assert parse_error(429, {}, "Wed, 21 Oct 2015 07:28:00 GMT").retry_after is None


def test_retries_honour_retry_after_then_succeed(monkeypatch):
    replies = [
        err(429, "overloaded", {"retry-after": "0.002"}),
        err(503, "unavailable"),
        httpx.Response(200, json=CLASSIFY_OK),
    ]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return replies.pop(0)

    sleeps: list[float] = []
    monkeypatch.setattr("clients.client.time.sleep", sleeps.append)
    with Client("http://x", "k", retry=FAST, transport=httpx.MockTransport(handler)) as c:
        r = c.classify("t", b"\x89PNG...", top_k=1)
    assert r.version == 2 and r.predictions[0][0].label == "a" and len(seen) == 3
    assert sleeps[0] == 0.002  # Retry-After honoured
    assert seen[0].headers["authorization"] == "Bearer k"
    assert seen[0].url.params["top_k"] == "1"


def test_no_retry_on_client_errors_and_gives_up_after_max(monkeypatch):
    monkeypatch.setattr("clients.client.time.sleep", lambda s: None)
    calls = []

    def not_found(request):
        calls.append(1)
        return err(404, "not_found")

    with (
        Client("http://x", retry=FAST, transport=httpx.MockTransport(not_found)) as c,
        pytest.raises(errors.NotFound),
    ):
        c.task("t")
    assert len(calls) == 1
    calls.clear()

    def busy(request):
        calls.append(1)
        return err(429, "overloaded", {"retry-after": "0"})

    with (
        Client("http://x", retry=FAST, transport=httpx.MockTransport(busy)) as c,
        pytest.raises(errors.Overloaded),
    ):
        c.info()
    assert len(calls) == 4  # first try + 3 retries


def test_connection_failure_is_typed():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    with (
        Client("http://x", retry=FAST, transport=httpx.MockTransport(refuse)) as c,
        pytest.raises(errors.ConnectionFailed),
    ):
        c.tasks()


def test_async_client_same_contract():
    replies = [err(503, "unavailable"), httpx.Response(204)]

    async def run():
        async with AsyncClient(
            "http://x", retry=FAST, transport=httpx.MockTransport(lambda r: replies.pop(0))
        ) as c:
            return await c.delete("t")

    assert asyncio.run(run()) is None and not replies


def test_env_defaults(monkeypatch):
    monkeypatch.setenv("VPT_URL", "http://envhost:9/")
    monkeypatch.setenv("VPT_API_KEY", "vpt_env")
    c = Client()
    assert c.url == "http://envhost:9" and c.api_key == "vpt_env"
    c.close()


def test_image_inputs_encode(tmp_path):
    arr = np.zeros((4, 5, 3), dtype=np.uint8)
    pil = Image.new("RGB", (3, 2))
    path = tmp_path / "x.jpg"
    pil.save(path)
    files = _images([arr, pil, path, str(path), b"raw"])
    assert [f[1][0] for f in files] == ["image0.png", "image1.png", "x.jpg", "x.jpg", "image4"]
    assert Image.open(io.BytesIO(files[0][1][1])).size == (5, 4)
    assert files[2][1][2] == "image/jpeg"
    assert len(_images(arr)) == 1 and len(_images(b"one")) == 1
    with pytest.raises(TypeError):
        _images([3.5])
    with pytest.raises(ValueError):
        _images([])
