"""Optional API keys: `Authorization: Bearer <key>` checked in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from nudging_core.config import ServerConfig
from nudging_core.errors import unauthorized

from .errors import error_response

HEALTH_PATHS = frozenset({"/health", "/ready"})
METRICS_PATHS = frozenset({"/metrics"})


def open_paths(server: ServerConfig) -> frozenset[str]:
    """The paths that need no key: health checks and metrics unless the config protects them."""
    paths: frozenset[str] = frozenset()
    if not server.protect_health:
        paths |= HEALTH_PATHS
    if not server.protect_metrics:
        paths |= METRICS_PATHS
    return paths


def _authorized(headers: list[str], keys: list[bytes]) -> bool:
    # Two Authorization headers are refused: which one counts would otherwise depend on the
    # server, and a front proxy may have checked the other.
    if len(headers) != 1 or not headers[0].lower().startswith("bearer "):
        return False
    header = headers[0]
    offered = header[7:].strip().encode()
    # Compare with every key so the time taken does not reveal which one nearly matched.
    matches = [hmac.compare_digest(offered, key) for key in keys]
    return any(matches)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], open_paths: Iterable[str] = HEALTH_PATHS) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if _authorized(Headers(scope=scope).getlist("authorization"), self.keys):
            await self.app(scope, receive, send)
            return
        await error_response(unauthorized())(scope, receive, send)
