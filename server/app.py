"""Builds the FastAPI app: one router per resource, error handlers, middleware, lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import server
from prompt_store.base import PromptStore
from server.api import inference, system, tasks
from server.api.errors import install_error_handlers
from server.api.middleware import RequestContext
from server.metrics import Metrics
from server.services import Services
from server.settings import Settings


def create_app(settings: Settings, *, store: PromptStore | None = None) -> FastAPI:
    """The app; its lifespan loads the backbone, opens the store and starts the scheduler."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await Services.start(settings, store=store, metrics=metrics)
        app.state.services = services
        try:
            yield
        finally:
            await services.stop()

    app = FastAPI(
        title="vpt-serve",
        version=server.__version__,
        description="Multi-tenant inference for Visual Prompt Tuning (Jia et al., ECCV 2022): "
        "one frozen ViT, many tasks, each a few prompt tokens and a linear head.",
        lifespan=lifespan,
    )
    metrics = Metrics()  # built here so the middleware and the services share one registry
    app.add_middleware(RequestContext, metrics=metrics, enabled_log=settings.access_log)
    install_error_handlers(app)
    for router in (inference.router, tasks.router, system.router):
        app.include_router(router)
    return app
