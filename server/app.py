"""The FastAPI application: models, routes, error handlers, and the middleware around them:
request ids, logs and metrics; shutdown; CORS; API keys; body size."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from nudging_core.config import Config
from nudging_core.registry import ModelRegistry

from . import playground
from .auth import APIKeyMiddleware, open_paths
from .connections import install_accept_error_log
from .errors import install_error_handlers
from .limits import BodySizeLimit
from .metrics import Metrics, metrics_endpoint
from .observability import ObservabilityMiddleware
from .routes import router
from .shutdown import EndRequestsOnShutdown


def create_app(config: Config) -> FastAPI:
    registry = ModelRegistry(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_accept_error_log()
        yield
        await registry.aclose()

    app = FastAPI(title="nudging-proxy", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(router)
    playground.install(app, config)
    server = config.server
    app.state.limits = server.limits
    app.state.send_timeout = server.send_timeout_seconds
    app.state.stream_open_within = server.stream_open_seconds
    app.state.metrics = metrics = Metrics()
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    # The last middleware added runs first: request ids and metrics see every answer, CORS
    # answers preflights before API keys are asked for, and no body is read without a key.
    app.add_middleware(BodySizeLimit, max_bytes=server.limits.max_body_bytes)
    keys = server.api_keys()
    if keys:
        # The playground's paths check keys themselves (a browser page cannot send a bearer token).
        unguarded = open_paths(server) | playground.paths(server)
        app.add_middleware(APIKeyMiddleware, keys=keys, open_paths=unguarded)
    if server.cors.allow_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=server.cors.allow_origins, allow_methods=["*"],
            allow_headers=["*"], expose_headers=["X-Request-Id"],
        )
    app.add_middleware(EndRequestsOnShutdown)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return app
