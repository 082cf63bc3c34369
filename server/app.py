"""The FastAPI application: models, routes, error handlers, optional API keys."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .auth import APIKeyMiddleware
from .config import Config
from .errors import install_error_handlers
from .registry import ModelRegistry
from .routes import router


def create_app(config: Config) -> FastAPI:
    registry = ModelRegistry(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await registry.aclose()

    app = FastAPI(title="nudging-proxy", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(router)
    keys = config.server.api_keys()
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys)
    return app
