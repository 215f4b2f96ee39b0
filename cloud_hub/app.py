"""The hub's FastAPI application.

Route handlers open their own transaction (``with ctx.sessions.begin() as s``) so that a
commit failure turns into an error response instead of happening after a 200 was sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from cloud_hub.api import dashboard, endpoint_certs, fleet, registry
from cloud_hub.api.body_limit import BodyLimit
from cloud_hub.api.docs import install_docs
from cloud_hub.api.errors import install_error_handlers
from cloud_hub.context import HubContext
from cloud_hub.settings import HubSettings


def create_app(settings: HubSettings | None = None, *, ctx: HubContext | None = None) -> FastAPI:
    """A hub app; pass ``ctx`` to share an already-open context (tests), else it opens one."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = ctx is None
        context = ctx or HubContext.open(settings or HubSettings())
        app.state.ctx = context
        if own:
            context.start_services()
        try:
            yield
        finally:
            if own:
                context.close()

    app = FastAPI(
        title="edgepack hub",
        version="0.1.0",
        description="Model and module registry, devices, deployments, fleet state.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.add_middleware(BodyLimit)
    install_error_handlers(app)
    app.include_router(registry.router)
    app.include_router(fleet.router)
    app.include_router(dashboard.router)
    app.include_router(endpoint_certs.router)
    return app
