"""Every route authenticates before it reads a body, and no route reads more than its limit.

Walks the app's own route table, so a new route is checked as soon as it exists: an API route (/v1,
and /v2 but its health probes: `middleware.gated`) must be covered by the walk (its path parameters
filled, its body's limit known), any other route must be listed in PUBLIC with the reason it needs no
key. /v2 answers errors in the Open Inference Protocol's shape, `{"error": "<message>"}`: there the
status code alone says what the error is. Against a real `vpt-serve` on 127.0.0.1 with a raw
socket client, which declares a large body and sends it slowly (or fast), to see when the server
answers and how much it had to be sent first:
- no key: 401 at once, whatever the route, the id or the body (the server does not wait for it);
- a valid key and a body over the limit: 413 at once for a declared size, at the limit for a body
  without Content-Length;
- the server's peak memory does not grow while large bodies are thrown at every route.
In process, routes added for the test that read without a limit are stopped at the largest one.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from server.api.bodies import SMALL_JSON_BYTES, largest_body
from server.api.middleware import gated
from server.app import create_app
from server.settings import Settings
from server.tenants import generate_key
from tests.server.helpers import BACKBONE_SPEC, artifact_bytes, write_tenants
from tests.server.server_proc import ServerProcess
from vpt.hub import load_backbone

KEY = generate_key()
AUTH = {"authorization": f"Bearer {KEY}"}
MAX_BODY = 128 * 1024  # VPT_MAX_BODY_BYTES of the server under test
MAX_ARTIFACT = 192 * 1024  # VPT_MAX_ARTIFACT_BYTES (a test artifact is ~2 KB)
SETTINGS = Settings(
    backbone=BACKBONE_SPEC,
    store="unused",
    open_mode=True,
    max_body_bytes=MAX_BODY,
    max_artifact_bytes=MAX_ARTIFACT,
)
HUGE = 64 * 1024 * 1024  # a declared body far over every limit
FLOOD = 16 * 1024 * 1024  # a body sent at full speed (a server that buffered it would grow by 16+ MiB)
MEMORY_SLACK = 8 * 1024 * 1024  # peak RSS growth allowed across a walk (allocator noise, buffers)
PARAMS = {"task_id": "t1", "version": "1"}  # values for the route table's path parameters

# Routes outside the API (no tenant key checked before routing), and why. Each gets a sample path (a
# mount's is a file under it). They read no body; the largest-body backstop still covers them.
PUBLIC = {
    "/healthz": ("/healthz", "liveness probe for orchestrators"),
    "/v2/health/live": ("/v2/health/live", "the Open Inference Protocol's liveness probe"),
    "/v2/health/ready": ("/v2/health/ready", "the Open Inference Protocol's readiness probe"),
    "/readyz": ("/readyz", "readiness probe for load balancers"),
    "/metrics": ("/metrics", "Prometheus scrape: checks its own token or admin key, reads no body"),
    "/": ("/", "the browser playground's page; its API calls carry the user's key"),
    "/static": ("/static/index.html", "the playground's files"),
    "/openapi.json": ("/openapi.json", "the API description"),
    "/docs": ("/docs", "API documentation (Swagger UI)"),
    "/docs/oauth2-redirect": ("/docs/oauth2-redirect", "part of Swagger UI"),
    "/redoc": ("/redoc", "API documentation (ReDoc)"),
    "/docs/assets": ("/docs/assets/swagger-ui.css", "the scripts and styles of /docs and /redoc"),
}
# API routes that take a body: (Content-Type, the route's own limit). A new one must be added here.
BODY_ROUTES = {
    ("PUT", "/v1/tasks/{task_id}"): ("application/octet-stream", MAX_ARTIFACT),
    ("POST", "/v1/tasks/{task_id}/classify"): ("image/png", MAX_BODY),
    ("POST", "/v1/tasks/{task_id}/embed"): ("image/png", MAX_BODY),
    ("POST", "/v1/tasks/{task_id}/rollback"): ("application/json", SMALL_JSON_BYTES),
    ("POST", "/v2/models/{task_id}/infer"): ("application/json", MAX_BODY),
    ("POST", "/v2/models/{task_id}/versions/{version}/infer"): ("application/json", MAX_BODY),
}


@dataclass(frozen=True)
class RouteEntry:
    method: str
    template: str  # the path as the route table has it
    target: str  # a path to send: parameters filled, a file under a mount
    takes_body: bool  # OpenAPI declares a request body


def route_table(app) -> list[RouteEntry]:
    """Every (method, route) of `app`, from its route table (recent FastAPI keeps included routers
    nested in `app.routes`; `iter_route_contexts` flattens them)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: `app.routes` is flat
        routes = list(app.routes)
    else:
        routes = list(iter_route_contexts(app.routes))
    out = []
    for route in routes:
        template = route.path
        if gated(template):
            missing = set(re.findall(r"{(\w+)", template)) - set(PARAMS)
            assert not missing, f"{template}: add a value for {missing} to PARAMS"
            target = template.format(**PARAMS)
        else:
            assert template in PUBLIC, f"{template} is neither an API route nor listed in PUBLIC"
            target = PUBLIC[template][0]
        extra = getattr(route, "openapi_extra", None) or {}
        takes_body = getattr(route, "body_field", None) is not None or "requestBody" in extra
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            out.append(RouteEntry(method, template, target, takes_body))
    return out


ROUTES = route_table(create_app(SETTINGS))
API = [r for r in ROUTES if gated(r.template)]
OPEN = [r for r in ROUTES if not gated(r.template)]


@dataclass(frozen=True)
class Reply:
    status: int | None  # None: no answer in time
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the request's first byte to the answer's
    sent: int  # body bytes sent before the answer came

    def error(self) -> dict:
        """The error as /v1 shapes it; /v2's `{"error": "<message>"}` gives a type of None."""
        err = json.loads(self.body)["error"]
        return err if isinstance(err, dict) else {"type": None, "message": err}


def expected_type(route_or_path: RouteEntry | str, type_: str) -> str | None:
    """The error type a response on this route carries: none under /v2 (the protocol's shape)."""
    path = route_or_path if isinstance(route_or_path, str) else route_or_path.template
    return None if path.startswith("/v2") else type_


def exchange(
    port: int,
    method: str,
    target: str,
    headers: dict[str, str],
    *,
    size: int,
    chunked: bool = False,
    chunk: int = 64 * 1024,
    pace: float = 0.0,
    wait: float = 5.0,
) -> Reply:
    """One request over a raw socket: declares a body of `size` bytes (or chunked, no size), sends it
    `chunk` bytes at a time, `pace` seconds apart, and stops sending once the answer starts."""
    length = "transfer-encoding: chunked" if chunked else f"content-length: {size}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"{method} {target} HTTP/1.1\r\nhost: 127.0.0.1\r\n{head}{length}\r\n\r\n".encode()
    payload = b"x" * chunk
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        start = time.monotonic()
        sock.sendall(request)
        sent = 0
        try:
            while sent < size and time.monotonic() - start < wait:
                if select.select([sock], [], [], pace)[0]:
                    break  # the answer (or a close) is here: stop sending
                n = min(chunk, size - sent)
                sock.sendall(b"%x\r\n%s\r\n" % (n, payload[:n]) if chunked else payload[:n])
                sent += n
            else:
                if chunked and sent == size:
                    sock.sendall(b"0\r\n\r\n")
            select.select([sock], [], [], max(0.0, wait - (time.monotonic() - start)))
            seconds = time.monotonic() - start
            data = b""
            while b"\r\n\r\n" not in data and (more := sock.recv(65536)):
                data += more
        except (TimeoutError, ConnectionError):
            return Reply(None, {}, b"", time.monotonic() - start, sent)
        if b"\r\n\r\n" not in data:
            return Reply(None, {}, b"", seconds, sent)
        head_bytes, body = data.split(b"\r\n\r\n", 1)
        lines = head_bytes.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        want = 0 if method == "HEAD" else int(hdrs.get("content-length", "0"))
        while len(body) < want and (more := sock.recv(65536)):
            body += more
        return Reply(status, hdrs, body, seconds, sent)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("limits")
    tenants = write_tenants(tmp, {"acme": KEY}, {"acme": {"rate_per_s": 10000.0}})
    proc = ServerProcess(
        tmp,
        backbone=BACKBONE_SPEC,
        tenants_file=tenants,
        open_mode="false",
        max_body_bytes=MAX_BODY,
        max_artifact_bytes=MAX_ARTIFACT,
        access_log="false",
    )
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_the_route_table_is_covered():
    """Every route is walked below: API routes with their parameters filled, the others listed as
    public with a reason, and every API route that takes a body has its limit in BODY_ROUTES."""
    assert len(API) >= 8  # route_table() refused anything unknown
    assert {r.template for r in OPEN} == set(PUBLIC), "PUBLIC lists a route that is gone"
    with_body = {(r.method, r.template) for r in API if r.takes_body}
    assert with_body == set(BODY_ROUTES), "an API route with a body needs its limit in BODY_ROUTES"
    assert largest_body(SETTINGS) >= max(limit for _, limit in BODY_ROUTES.values())


# A server that read the 64 MiB body at ~50 KB/s would answer after ~20 minutes; one that refuses
# before reading answers at once. The bound leaves room for a machine busy with other work (CI must pass
# with one core kept busy) and still tells the two apart by a factor of ~400.
ANSWERED_AT_ONCE_S = 3.0


def _slow_huge(server: ServerProcess, route: RouteEntry, headers: dict[str, str]) -> Reply:
    """64 MiB declared, ~50 KB/s sent: a server that waits for the body answers after the deadline."""
    return exchange(
        server.port,
        route.method,
        route.target,
        headers,
        size=HUGE,
        chunk=1024,
        pace=0.02,
        wait=2 * ANSWERED_AT_ONCE_S,
    )


def _answered_at_once(r: Reply) -> bool:
    """Answered without waiting for the body: within the bound, after at most 256 KiB of it was sent."""
    return r.seconds < ANSWERED_AT_ONCE_S and r.sent <= 4 * 64 * 1024


@pytest.mark.parametrize("route", API, ids=lambda r: f"{r.method} {r.template}")
def test_no_key_is_refused_before_the_body(server, route):
    for headers in ({}, {"authorization": "Bearer vpt_not-a-real-key"}):
        r = _slow_huge(server, route, headers)
        assert r.status == 401, (route, headers, r)
        assert _answered_at_once(r), r
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.error()["type"] == expected_type(route, "unauthorized")


@pytest.mark.parametrize("route", API, ids=lambda r: f"{r.method} {r.template}")
def test_over_limit_bodies_are_refused(server, route):
    r = _slow_huge(server, route, AUTH)
    assert r.status == 413 and r.error()["type"] == expected_type(route, "payload_too_large"), (route, r)
    assert _answered_at_once(r), r
    if not route.takes_body:
        return
    media, limit = BODY_ROUTES[(route.method, route.template)]
    headers = {**AUTH, "content-type": media}
    # One byte over the route's own limit: declared, and without Content-Length (stopped at the limit).
    for chunked in (False, True):
        r = exchange(
            server.port, route.method, route.target, headers, size=limit + 1, chunked=chunked, chunk=16384
        )
        assert r.status == 413 and r.error()["type"] == expected_type(route, "payload_too_large"), (
            route,
            chunked,
            r,
        )
        assert "limit" in r.error()["message"]


@pytest.mark.parametrize("route", OPEN, ids=lambda r: f"{r.method} {r.template}")
def test_public_routes_refuse_a_body_over_the_largest_limit(server, route):
    r = _slow_huge(server, route, {})
    assert r.status == 413, (route, r)
    assert _answered_at_once(r), r
    if route.method != "HEAD":
        assert r.error()["type"] == expected_type(route, "payload_too_large")


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/tasks/UPPER"),  # an invalid id
        ("DELETE", "/v1/tasks/%2e%2e"),
        ("POST", "/v1/tasks/-x/classify"),
        ("GET", "/v1/tasks?limit=0&cursor=..%2Fx"),  # invalid query parameters
        ("GET", "/v1/no-such-route"),  # 404 with a key
        ("PATCH", "/v1/info"),  # 405 with a key
        ("GET", "/v2/models/UPPER"),
        ("POST", "/v2/models/t1/versions/x/infer"),
        ("GET", "/v2/no-such-route"),
        ("DELETE", "/v2"),
    ],
)
def test_invalid_paths_are_401_without_a_key(server, method, path):
    """A caller without a key learns nothing about ids, routes or parameters."""
    r = httpx.request(method, server.url + path, timeout=5.0)
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert (err["type"] if isinstance(err, dict) else None) == expected_type(path, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    keyed = httpx.request(method, server.url + path, headers=AUTH, timeout=5.0)
    assert keyed.status_code in (400, 404, 405, 422), keyed.text  # what a key holder learns


def test_rollback_reads_a_small_json_body(server):
    backbone = load_backbone(BACKBONE_SPEC)
    for seed in (0, 1):
        r = httpx.put(
            f"{server.url}/v1/tasks/rb",
            content=artifact_bytes(backbone, P=2, mode="shallow", C=3, seed=seed),
            headers={**AUTH, "content-type": "application/octet-stream"},
        )
        assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{server.url}/v1/tasks/rb/rollback", json={"version": 1}, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    for content, media, status, word in [
        (b'{"version": 0}', "application/json", 422, "version"),
        (b"{", "application/json", 422, "JSON"),
        (b"", "application/json", 422, "required"),
        (b'{"version": 1}', "text/plain", 415, "application/json"),  # a cross-site form could send it
    ]:
        r = httpx.post(
            f"{server.url}/v1/tasks/rb/rollback", content=content, headers={**AUTH, "content-type": media}
        )
        assert r.status_code == status and word in r.json()["error"]["message"], (content, media, r.text)


@contextmanager
def peak_rss_growth(pid: int) -> Iterator[list[int]]:
    """Yields a list that holds, afterwards, how far the process's peak RSS rose above its RSS at the
    start: from VmHWM reset by /proc/<pid>/clear_refs, else from sampling VmRSS every millisecond."""
    status = Path(f"/proc/{pid}/status")

    def kib(field: str) -> int:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.M).group(1))  # type: ignore[union-attr]

    start, out = kib("VmRSS"), []
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak to the current RSS
        sampled = None
    except OSError:
        sampled, stop = [start], threading.Event()

        def sample() -> None:
            while not stop.wait(0.001):
                sampled.append(kib("VmRSS"))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
    yield out
    if sampled is None:
        out.append((kib("VmHWM") - start) * 1024)
    else:
        stop.set()
        thread.join()
        out.append((max(sampled) - start) * 1024)


def test_large_bodies_do_not_grow_the_server(server):
    """16 MiB bodies sent at full speed to every route, with no key and with one: the server answers
    and drops them, its peak memory stays within a few MB."""
    warm = API[0]
    exchange(server.port, warm.method, warm.target, {}, size=FLOOD)  # first-use allocations
    with peak_rss_growth(server.proc.pid) as growth:
        for route in ROUTES:
            for headers in ({}, AUTH):
                r = exchange(server.port, route.method, route.target, headers, size=FLOOD, chunk=256 * 1024)
                assert r.status in (401, 413), (route, headers, r)
    assert growth[0] < MEMORY_SLACK, f"peak RSS grew by {growth[0] / 2**20:.1f} MiB"


def test_the_backstop_stops_a_route_that_reads_without_a_limit():
    """A future route that lets FastAPI parse its body, or reads `request.body()`, still cannot read
    more than the largest limit: a body without Content-Length is stopped there (413)."""
    app = create_app(SETTINGS)  # no lifespan: no key check, no backbone; the middleware is all there
    got: list[int] = []

    @app.post("/v1/parsed")
    async def parsed(payload: dict) -> dict:
        got.append(len(payload))
        return {}

    @app.post("/v1/raw")
    async def raw(request: Request) -> dict:
        got.append(len(await request.body()))
        return {}

    client = TestClient(app)
    over = largest_body(SETTINGS) + 1

    def chunks() -> Iterator[bytes]:  # no Content-Length: the size is only known while reading
        yield b'{"a": "' + b"x" * (over - 9) + b'"}'

    for path in ("/v1/parsed", "/v1/raw"):
        r = client.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large", (path, r.text)
    assert got == []
    ok = client.post("/v1/raw", content=b"x" * (over - 1))
    assert ok.status_code == 200 and got == [over - 1]
