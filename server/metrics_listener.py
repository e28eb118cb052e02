"""`/metrics` alone on a port of its own (VPT_METRICS_PORT), and the scrape token both ports check.

The API port faces clients; the metrics port is for Prometheus on the internal network, so it is left
out of what compose publishes and what the Kubernetes Service exposes. It serves prometheus_client's
WSGI exposition (text or OpenMetrics by the Accept header, gzip, `name[]=` filters) from a threaded
stdlib HTTP server, as prometheus_client's own `start_http_server` does, with the token checked in
front and every other path a 404. A thread rather than a second uvicorn server: a scrape every few
seconds needs nothing of the event loop, and `close` stops it and frees the port.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from pydantic import SecretStr

from server.bearer import bearer_matches

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsListener:
    """`GET /metrics` of `registry` on host:port in a daemon thread; `close` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, token: SecretStr | None) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # IPv4 or IPv6

        class _Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._httpd = make_server(
                host, port, _guard(make_wsgi_app(registry), token), _Server, handler_class=_QuietHandler
            )
        except OSError as e:
            raise SystemExit(f"cannot serve metrics on {host}:{port} (VPT_METRICS_PORT): {e}") from None
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="vpt-metrics", daemon=True)
        self._thread.start()
        log.info(
            "metrics on http://%s:%d/metrics (%s)", host, self.port, "token required" if token else "no token"
        )

    def close(self) -> None:
        self._httpd.shutdown()  # returns once serve_forever has stopped
        self._httpd.server_close()
        self._thread.join()


def _guard(app: WSGIApp, token: SecretStr | None) -> WSGIApp:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            return _error(
                start_response, "404 Not Found", "not_found", "only /metrics is served on this port"
            )
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _error(start_response, "405 Method Not Allowed", "method_not_allowed", "only GET /metrics")
        if token is not None and not bearer_matches(token, environ.get("HTTP_AUTHORIZATION", "")):
            return _error(
                start_response,
                "401 Unauthorized",
                "unauthorized",
                "send the metrics token: 'Authorization: Bearer <VPT_METRICS_TOKEN>'",
                [("WWW-Authenticate", "Bearer")],
            )
        return app(environ, start_response)

    return guarded


def _error(
    start_response: Callable[..., Any],
    status: str,
    type_: str,
    message: str,
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    """The API's error body (`{"error": {"type", "message"}}`), so clients parse both ports alike."""
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    start_response(status, [("Content-Type", "application/json"), *(headers or [])])
    return [body]


class _QuietHandler(WSGIRequestHandler):
    """No stderr line per scrape (wsgiref's default). A connection idle for `timeout` seconds is closed:
    each holds a thread, and this port may need no token."""

    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        pass
