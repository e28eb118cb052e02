"""Builds the FastAPI app: one router per resource, error handlers, middleware, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

import server
from prompt_store.base import PromptStore
from server.api import inference, system, tasks, v2
from server.api.bodies import largest_body
from server.api.docs import install_docs
from server.api.errors import install_error_handlers
from server.api.middleware import BodyLimit, RateGate, RequestContext
from server.core.client import CoreAddress
from server.metrics import Metrics
from server.metrics_listener import MetricsListener
from server.services import Services
from server.settings import Settings
from server.tenants import TenantRegistry

STATIC_DIR = Path(__file__).parent / "static"  # the browser playground (clients, issue F): no build step


def create_app(
    settings: Settings, *, store: PromptStore | None = None, core: CoreAddress | None = None
) -> FastAPI:
    """The app; its lifespan loads the backbone, opens the store and starts the scheduler, or, with
    `core` (an API-server process), connects to the engine-core process there."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The metrics port first, so a port already taken fails before the slow start, and last to
        # go, so Prometheus sees the warm-up and the drain.
        listener = None
        if settings.metrics_port is not None and core is None:  # else the engine core serves the port
            host = settings.metrics_host or settings.host
            listener = MetricsListener(metrics.registry, host, settings.metrics_port, settings.metrics_token)
        try:
            try:
                services = await Services.start(settings, store=store, metrics=metrics, core=core)
            except Exception as e:
                app.state.startup_error = e  # `vpt-serve` explains the ones it knows without a traceback
                raise
            app.state.services = services
            # `vpt-serve` in one process sets this hook: a server whose engine process died exits
            # (status 1) for its supervisor to restart it. Embedded apps (tests) keep serving 503s and
            # failing /healthz, and so do API servers, until their supervisor stops them.
            services.core.on_death(getattr(app.state, "on_engine_death", None))
            if services.tenants is not None:
                _reload_on_sighup(services.tenants)
            try:
                yield
            finally:
                await services.stop()
        finally:
            if listener is not None:
                await asyncio.to_thread(listener.close)  # waits for its loop (up to 0.5 s)

    app = FastAPI(
        title="vpt-serve",
        version=server.__version__,
        description="Multi-tenant inference for Visual Prompt Tuning (Jia et al., ECCV 2022): "
        "one frozen ViT, many tasks, each a few prompt tokens and a linear head.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's pages load their scripts from a CDN: install_docs serves them here
        redoc_url=None,
    )
    # Built here so the middleware, the services and the metrics port share one registry.
    metrics = Metrics(tenant_labels=settings.metrics_tenant_labels)
    # Inside out: BodyLimit, RateGate, RequestContext (the last added runs first). A caller without a
    # valid key gets its 401 before anything else looks at the request; every refusal is logged.
    app.add_middleware(BodyLimit, limit=largest_body(settings))
    app.add_middleware(RateGate)
    app.add_middleware(RequestContext, metrics=metrics, enabled_log=settings.access_log)
    install_error_handlers(app)
    for router in (inference.router, tasks.router, system.router, v2.router):
        app.include_router(router)
    if settings.metrics_port is None:  # else only the metrics port serves /metrics: here it is a 404
        app.include_router(system.metrics_router)
    install_docs(app)  # /docs, /redoc and /docs/assets/*: no key, like /openapi.json
    # The playground: `/` and `/static/*` only, so no API route is shadowed. It needs no key to load;
    # its API calls carry the key the user types.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


def _reload_on_sighup(registry: TenantRegistry) -> None:
    """`kill -HUP` re-reads the tenants file (it is also re-read when its mtime changes)."""
    # Not the main thread (in-process tests) or no signals (Windows): mtime polling remains.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, registry.reload)
