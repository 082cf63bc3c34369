"""FastAPI glue both upstream servers share: error handlers, common routes, body reading, SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .openai_api import ApiError, Counters, ServerWording, models_body


def add_error_handlers(app: FastAPI, wording: ServerWording) -> None:
    """Refusals and unexpected failures answer with vLLM's error body."""

    @app.exception_handler(ApiError)
    async def _refused(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def _failed(_: Request, error: Exception) -> JSONResponse:
        failure = ApiError(f"{wording.internal_error}: {type(error).__name__}", 500,
                           "InternalServerError")
        return JSONResponse(failure.body(), status_code=500)


def add_common_routes(app: FastAPI, name: str, created: int, max_model_len: int,
                      wording: ServerWording, stats: Counters, reset_stats: Callable[[], None]) -> None:
    """``/health``, ``/v1/models``, and ``/stats`` with ``/stats/reset`` for tests and benchmarks.

    `reset_stats` resets `stats` the way that server's threads allow.
    """

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_body(name, created, max_model_len, wording)

    @app.get("/stats")
    async def read_stats() -> dict[str, int]:
        return stats.as_dict()

    @app.post("/stats/reset")
    async def reset() -> dict[str, int]:
        reset_stats()
        return stats.as_dict()


async def read_json(request: Request) -> Any:
    """The request's JSON body; a client that left raises starlette's ClientDisconnect."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError("the request body is not valid JSON") from None


class EventStream(StreamingResponse):
    """An SSE response as vLLM sends it."""

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
