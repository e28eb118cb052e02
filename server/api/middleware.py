"""Pure ASGI middleware: request ids, JSON access log, latency metrics; the rate-limit gate.

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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import authenticate, charge_rate
from server.api.errors import error_response
from server.errors import Overloaded, Unauthorized
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
                self.metrics.tenant_requests.labels(tenant, template, str(status)).inc()
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


class RateGate:
    """ASGI middleware: refuse a rate-limited API request before routing.

    A flooding tenant's requests are mostly refused by its rate limit. Refused inside FastAPI (routing,
    dependency resolution, exception handlers) each cost ~0.4 ms of event-loop CPU, which the engine
    thread and other tenants' requests wait for (GIL); here a refusal costs a header lookup, a key
    hash and a token bucket. It is where API requests are authenticated (with tenants): the caller it
    admits goes on in `state.admitted_caller`, a missing or bad key in `state.auth_error`, and the
    routes' dependency answers from those without hashing the key again.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._charge(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            response = error_response(refusal.status, refusal.type, refusal.message, refusal.headers)
            await response(scope, receive, send)

    @staticmethod
    def _charge(scope: Scope) -> Overloaded | None:
        """Authenticate an API request and charge it to its tenant's bucket; the refusal if over it.

        The outcome goes on in the request state for the routes' dependency (`deps.get_principal`):
        `admitted_caller`, or `auth_error` (no key, bad key), which the route answers with a 401."""
        services = getattr(scope["app"].state, "services", None)  # None while starting
        if not scope["path"].startswith("/v1/") or services is None or services.tenants is None:
            return None
        state = scope.setdefault("state", {})
        try:
            # Headers(): the first Authorization header, as Starlette's request.headers reads it.
            caller = authenticate(services.tenants, Headers(scope=scope).get("authorization", ""))
        except Unauthorized as e:
            state["auth_error"] = e
            return None
        state["tenant"] = caller.name  # for the access log and per-tenant metrics
        try:
            charge_rate(services, caller)
        except Overloaded as e:
            return e
        state["admitted_caller"] = caller
        return None
