"""Pure ASGI middleware: request ids, JSON access log, latency metrics; the gate that authenticates
and rate-limits API requests; the body-size backstop.

Pure ASGI (not BaseHTTPMiddleware) so the route still sees `http.disconnect` from the client and can
free a disconnected client's queued work.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import authenticate, charge_rate
from server.api.errors import error_response, is_v2, route_path
from server.errors import InvalidRequest, Overloaded, PayloadTooLarge, ServingError, Unauthorized
from server.metrics import Metrics

access_log = logging.getLogger("vpt.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContext:
    """ASGI middleware: honours/sets X-Request-ID, logs one JSON line per request, records latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics, enabled_log: bool = True) -> None:
        self.app, self.metrics, self.enabled_log = app, metrics, enabled_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_progress.dec()
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            # The route template (not the raw path) keeps the label set bounded.
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_latency.labels(template, str(status)).observe(elapsed)
            state: dict[str, Any] = scope.get("state", {})
            tenant = state.get("tenant")
            if tenant is not None:
                self.metrics.tenant_request(tenant, template, status)
            if self.enabled_log:
                access_log.info(
                    json.dumps(
                        {
                            "ts": time.time(),
                            "request_id": request_id,
                            "method": scope.get("method"),
                            "path": scope.get("path"),
                            "route": template,
                            "status": status,
                            "duration_ms": round(elapsed * 1000, 3),
                            "tenant": tenant,
                            "client": (scope.get("client") or [None])[0],
                        }
                    )
                )


def gated(path: str) -> bool:
    """An API path: authenticated and charged by `RateGate`. /v1, and /v2 (the Open Inference Protocol,
    server metadata included: it names the server's version, which /v1/info also keeps behind a key)
    except its health probes, which are public like /healthz and /readyz."""
    return path.startswith("/v1/") or (is_v2(path) and not path.startswith("/v2/health/"))


async def _refuse(err: ServingError, scope: Scope, receive: Receive, send: Send) -> None:
    v2 = is_v2(route_path(scope))
    await error_response(err.status, err.type, err.message, err.headers, v2=v2)(scope, receive, send)


class RateGate:
    """ASGI middleware: authenticate an API request and refuse it (401, 429) before routing.

    Every API request (`gated`: /v1, and /v2 but its health probes) is authenticated here (with
    tenants), before FastAPI reads its body or validates its path and query: a caller without a valid
    key costs a header lookup and a key hash, gets a 401 whatever the route, id or body, and learns
    nothing about which routes and ids exist. The unread body is left to the HTTP server, which
    discards it as it arrives (in a fixed buffer) once the response is sent.

    A flooding tenant's requests are mostly refused by its rate limit. Refused inside FastAPI (routing,
    dependency resolution, exception handlers) each cost ~0.4 ms of event-loop CPU, which the engine
    thread and other tenants' requests wait for (GIL); here a refusal costs a header lookup, a key
    hash and a token bucket. The caller it admits goes on in `state.admitted_caller` for the routes'
    dependency (`deps.get_principal`), which does not hash the key again.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._admit(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await _refuse(refusal, scope, receive, send)

    @staticmethod
    def _admit(scope: Scope) -> Unauthorized | Overloaded | None:
        """Authenticate an API request and charge it to its tenant's bucket; the refusal if any."""
        services = getattr(scope["app"].state, "services", None)  # None while starting
        if not gated(route_path(scope)) or services is None or services.tenants is None:
            return None
        state = scope.setdefault("state", {})
        try:
            # Headers(): the first Authorization header, as Starlette's request.headers reads it.
            caller = authenticate(services.tenants, Headers(scope=scope).get("authorization", ""))
        except Unauthorized as e:
            return e
        state["tenant"] = caller.name  # for the access log and per-tenant metrics
        try:
            charge_rate(services, caller)
        except Overloaded as e:
            return e
        state["admitted_caller"] = caller
        return None


class BodyLimit:
    """ASGI middleware: no request body of more than `limit` bytes reaches the app (413).

    `limit` is the largest body any route accepts; each route reads with its own, smaller limit
    (`bodies.read_body`). This is the backstop for a route, present or future, that forgets to or
    lets FastAPI parse its body: a declared Content-Length over the limit is refused before routing,
    and a body without one is stopped at the limit, so no route can buffer more than `limit` bytes.
    The stop is an HTTPException raised from `receive`, because FastAPI's body parsing passes those
    on (any other exception becomes its 400 "error parsing the body"); the error handlers answer it.
    Inside `RateGate`, so a caller without a valid key gets its 401 first.

    Not FastAPI's own `max_body_size`: recent versions only, its 413 is not in our error shape, and
    the app-wide one runs before our middleware (a 413 before the 401, and not logged).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        refusal: ServingError | None = None
        if declared is not None:
            try:
                if int(declared) > self.limit:
                    refusal = PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {self.limit}")
            except ValueError:
                refusal = InvalidRequest("invalid Content-Length header")
        if refusal is not None:
            await _refuse(refusal, scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"body exceeds the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)
