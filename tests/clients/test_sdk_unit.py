"""SDK without a vpt-serve: error mapping, retry policy, timeouts, request paths, image encoding,
typed results.

The transport is httpx.MockTransport (httpx's own test transport), standing in for the network only,
except in the timeout tests: there a real socket on 127.0.0.1 accepts connections and never answers.
The server's error types are read from the server's own code (its exception classes and handlers).
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus

import httpx
import numpy as np
import pytest
from PIL import Image

from clients import errors
from clients.client import AsyncClient, Client, RetryPolicy, _images
from clients.errors import parse_error
from server.api.schemas import TASK_EXAMPLE

FAST = RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=0.01)
TASK_OK = TASK_EXAMPLE  # the server's own OpenAPI example of a task reply
CLASSIFY_OK = {
    "task_id": "t",
    "version": 2,
    "predictions": [[{"label": "a", "index": 0, "score": 0.9}]],
    "timings": {"decode_ms": 1, "queue_ms": 1, "compute_ms": 1, "total_ms": 3, "batch_size": 4},
}


def err(status: int, type_: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"error": {"type": type_, "message": "boom"}}, headers=headers)


def server_error_types() -> set[str]:
    """Every `error.type` the server can answer, found in its code: the `type` of each `ServingError`
    class (server/errors.py; the middleware's refusals are such classes too), and what the handlers of
    server/api/errors.py answer for a validation error and for each 4xx/5xx HTTPException."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    from server import errors as server_errors
    from server.api.errors import install_error_handlers

    types: set[str] = set()
    todo = [server_errors.ServingError]
    while todo:
        cls = todo.pop()
        types.add(cls.type)
        todo += cls.__subclasses__()

    app = FastAPI()
    install_error_handlers(app)
    scope = {
        "type": "http",
        "method": "GET",
        "scheme": "http",
        "server": ("testserver", 80),
        "path": "/v1/x",
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }

    async def answer(key: type[Exception], exc: Exception) -> str:
        response = await app.exception_handlers[key](Request(scope), exc)
        return json.loads(response.body)["error"]["type"]

    async def collect() -> None:
        types.add(await answer(RequestValidationError, RequestValidationError([])))
        types.add(await answer(Exception, RuntimeError("a bug")))
        for status in HTTPStatus:
            if 400 <= status < 600:
                types.add(await answer(HTTPException, HTTPException(status)))

    asyncio.run(collect())
    return types


SERVER_ERROR_TYPES = sorted(server_error_types())


def test_server_error_types_are_found():
    """The derivation above sees the router's own types, not only the domain classes."""
    assert {"not_found", "method_not_allowed", "http_error", "invalid_request", "internal"} <= set(
        SERVER_ERROR_TYPES
    )


@pytest.mark.parametrize("type_", SERVER_ERROR_TYPES)
def test_every_server_error_type_has_its_class(type_):
    e = parse_error(418, {"error": {"type": type_, "message": "m"}})  # 418: no status fallback applies
    assert isinstance(e, errors.APIError) and e.message == "m" and e.status == 418
    assert type(e).type == type_, f"the SDK has no class for the server's error type {type_!r}"
    assert errors.ERRORS[type_] is type(e)


def test_the_sdk_knows_no_error_type_the_server_does_not_send():
    assert set(errors.ERRORS) == set(SERVER_ERROR_TYPES)


def test_the_sdk_imports_no_server_torch_numpy_or_pil():
    code = (
        "import sys, clients, clients.client, clients.errors, clients.types, clients.cli, "
        "clients.cli_remote\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'server', 'torch', 'numpy', 'PIL'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_or_non_json_errors_fall_back_to_status():
    assert type(parse_error(404, "<html>")) is errors.NotFound
    assert type(parse_error(405, "<html>")) is errors.MethodNotAllowed
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


def test_only_refusals_that_did_nothing_are_retried(monkeypatch):
    """A 503 store_unavailable may come after the store committed: resending an upload could add a
    version twice, a delete answer 404, so only a draining server's 503 (`unavailable`) is retried for
    them; reads retry both. A corrupt_artifact 503 is never retried."""
    monkeypatch.setattr("clients.client.time.sleep", lambda s: None)
    calls: list[str] = []

    def store_down(request):
        calls.append(request.method)
        return err(503, "store_unavailable")

    with Client("http://x", retry=FAST, transport=httpx.MockTransport(store_down)) as c:
        with pytest.raises(errors.StoreUnavailable):
            c.upload("t", b"artifact")
        assert calls == ["PUT"]
        calls.clear()
        with pytest.raises(errors.StoreUnavailable):
            c.task("t")
        assert calls == ["GET"] * 4
        calls.clear()
        with pytest.raises(errors.StoreUnavailable):  # the delete may have committed too
            c.delete("t")
        assert calls == ["DELETE"]
    calls.clear()

    def corrupt(request):
        calls.append(request.method)
        return err(503, "corrupt_artifact")

    with (
        Client("http://x", retry=FAST, transport=httpx.MockTransport(corrupt)) as c,
        pytest.raises(errors.CorruptArtifact),
    ):
        c.classify("t", b"\x89PNG...")
    assert calls == ["POST"]  # a damaged stored version stays damaged: not worth a retry
    replies = [err(503, "unavailable"), httpx.Response(201, json=TASK_OK)]

    def draining_then_ok(request):
        calls.append(request.method)
        return replies.pop(0)

    calls.clear()
    with Client("http://x", retry=FAST, transport=httpx.MockTransport(draining_then_ok)) as c:
        assert c.upload("t", b"artifact").task_id == TASK_OK["task_id"]
    assert calls == ["PUT", "PUT"]


def test_an_undecodable_reply_is_an_sdk_error():
    def gzip_lies(request):
        return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})

    with (
        Client("http://x", retry=FAST, transport=httpx.MockTransport(gzip_lies)) as c,
        pytest.raises(errors.ConnectionFailed, match="DecodingError"),
    ):
        c.info()


def test_connection_failure_is_typed():
    def refuse(request):
        raise httpx.ConnectError("refused", request=request)

    with (
        Client("http://x", retry=FAST, transport=httpx.MockTransport(refuse)) as c,
        pytest.raises(errors.ConnectionFailed),
    ):
        c.tasks()


def test_connect_timeout_is_retried_read_timeout_is_not(monkeypatch):
    """Before the request is sent (connect/pool timeout) a retry is safe; after it (read/write
    timeout) the server may have acted on it, so the SDK stops at once. Either way: `Timeout`."""
    monkeypatch.setattr("clients.client.time.sleep", lambda s: None)
    for exc, calls_expected in [
        (httpx.ConnectTimeout, 4),
        (httpx.PoolTimeout, 4),
        (httpx.ReadTimeout, 1),
        (httpx.WriteTimeout, 1),
    ]:
        calls = []

        def handler(request, exc=exc, calls=calls):
            calls.append(1)
            raise exc("timed out", request=request)

        with (
            Client("http://x", retry=FAST, transport=httpx.MockTransport(handler)) as c,
            pytest.raises(errors.Timeout) as info,
        ):
            c.upload("t", b"artifact")
        assert len(calls) == calls_expected, exc
        assert isinstance(info.value, errors.ConnectionFailed) and exc.__name__ in str(info.value)
        assert isinstance(info.value.__cause__, exc)


# Every SDK method: its arguments, and whether it may be sent twice (resent after a lost connection).
REPEATABLE = {
    "info": ((), True),
    "tasks": ((), True),
    "task": (("t",), True),
    "classify": (("t", b"img"), True),
    "embed": (("t", b"img"), True),
    "rollback": (("t", 1), True),
    "upload": (("t", b"artifact"), False),
    "delete": (("t",), False),
}


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (httpx.RemoteProtocolError, "Server disconnected without sending a response."),
        (httpx.ReadError, "[Errno 104] Connection reset by peer"),
        (httpx.WriteError, "[Errno 32] Broken pipe"),
    ],
)
def test_a_lost_connection_is_resent_only_for_calls_that_may_be_sent_twice(exc, message):
    """A connection closed or reset before the reply (a keep-alive connection the server closed as the
    request went out, or a server that read it and died): reads, classify, embed and rollback are sent
    again, by both clients; an upload or a delete, which may have arrived, is sent once."""

    def drop(request):
        sent.append(request.method)
        raise exc(message, request=request)

    for name, (args, repeatable) in REPEATABLE.items():
        for kind in ("sync", "async"):
            sent: list[str] = []
            with pytest.raises(errors.ConnectionFailed) as info:
                if kind == "sync":
                    with Client("http://x", retry=FAST, transport=httpx.MockTransport(drop)) as c:
                        getattr(c, name)(*args)
                else:

                    async def run(name=name, args=args):
                        async with AsyncClient(
                            "http://x", retry=FAST, transport=httpx.MockTransport(drop)
                        ) as c:
                            await getattr(c, name)(*args)

                    asyncio.run(run())
            assert len(sent) == (4 if repeatable else 1), (name, kind)  # first try + 3 retries, or once
            assert type(info.value) is errors.ConnectionFailed and exc.__name__ in str(info.value)
            assert isinstance(info.value.__cause__, exc)


def test_a_lost_keep_alive_connection_is_retried_once_then_answered(caplog):
    replies: list[Exception | httpx.Response] = [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        httpx.Response(200, json=CLASSIFY_OK),
    ]

    def handler(request):
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply

    caplog.set_level("INFO", logger="clients.client")
    with Client("http://x", retry=FAST, transport=httpx.MockTransport(handler)) as c:
        assert c.classify("t", b"img").version == 2
    assert not replies
    [retry] = [r.getMessage() for r in caplog.records if r.name == "clients.client"]
    assert retry.startswith("retry 1 of POST /v1/tasks/t/classify in ") and "RemoteProtocolError" in retry


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP server on 127.0.0.1 that accepts connections, never reads and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.05)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])
            except OSError:  # the accept timeout (socket.timeout is an OSError)
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", conns
    stop.set()
    t.join()
    for c in conns:
        c.close()
    sock.close()


BIG = b"\0" * (64 << 20)  # more than the loopback socket buffers take: a silent peer blocks the write


@pytest.mark.parametrize(
    ("method", "timeout_type"),
    [("info", "ReadTimeout"), ("upload", "WriteTimeout")],
)
def test_timeouts_raise_timeout_sync_and_async(silent_server, method, timeout_type):
    url, conns = silent_server
    args = () if method == "info" else ("t", BIG)

    def sync() -> None:
        with Client(url, retry=FAST, timeout=0.3) as c:
            getattr(c, method)(*args)

    async def run_async() -> None:
        async with AsyncClient(url, retry=FAST, timeout=0.3) as c:
            await getattr(c, method)(*args)

    for attempt in (sync, lambda: asyncio.run(run_async())):
        conns_before = len(conns)
        start = time.monotonic()
        with pytest.raises(errors.Timeout) as info:
            attempt()
        assert time.monotonic() - start < 5
        assert isinstance(info.value, errors.ConnectionFailed) and info.value.status is None
        assert timeout_type in str(info.value) and "0.3 s" in str(info.value)
        assert str(info.value).startswith("timeout: timed out after 0.3 s")
        time.sleep(0.1)  # let the accept loop catch up
        assert len(conns) - conns_before == 1  # sent once: not retried


def test_task_ids_are_percent_encoded_in_every_path():
    task = "a b/c?d#e%f&g+é"
    enc = "a%20b%2Fc%3Fd%23e%25f%26g%2B%C3%A9"
    seen: list[tuple[str, bytes]] = []
    info = {**TASK_OK, "task_id": task}
    embed = {**CLASSIFY_OK, "features": [[0.0]]}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.raw_path))
        path = request.url.raw_path.decode()
        if path.endswith("/classify"):
            return httpx.Response(200, json=CLASSIFY_OK)
        if path.endswith("/embed"):
            return httpx.Response(200, json=embed)
        return httpx.Response(204) if request.method == "DELETE" else httpx.Response(200, json=info)

    with Client("http://x", retry=FAST, transport=httpx.MockTransport(handler)) as c:
        c.classify(task, b"img")
        c.embed(task, b"img")
        c.upload(task, b"artifact")
        c.task(task)
        c.rollback(task, 1)
        c.delete(task)

    async def run_async() -> None:
        async with AsyncClient("http://x", retry=FAST, transport=httpx.MockTransport(handler)) as c:
            await c.task(task)

    asyncio.run(run_async())
    base = f"/v1/tasks/{enc}".encode()
    assert seen == [
        ("POST", base + b"/classify"),
        ("POST", base + b"/embed"),
        ("PUT", base),
        ("GET", base),
        ("POST", base + b"/rollback"),
        ("DELETE", base),
        ("GET", base),
    ]


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


def test_top_k_zero_is_sent_for_the_server_to_refuse():
    """`top_k=0` goes out as given (the server answers 422), not dropped for the server's default of 5."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=CLASSIFY_OK)

    with Client("http://x", "k", retry=FAST, transport=httpx.MockTransport(handler)) as c:
        c.classify("t", b"\x89PNG...", top_k=0)
        c.classify("t", b"\x89PNG...")
    assert seen[0].url.params["top_k"] == "0"
    assert "top_k" not in seen[1].url.params
