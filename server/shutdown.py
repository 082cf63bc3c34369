"""Graceful shutdown: requests still running when the grace period ends are ended cleanly.

On SIGTERM uvicorn stops accepting connections and waits for running requests up to
`timeout_graceful_shutdown` (our `server.shutdown_grace_seconds`), then cancels them. A
cancelled request would otherwise leave its client with a cut connection; here a started
event stream gets one error event and `[DONE]`, and a request not yet answered a 503.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nudging_core.errors import SERVER_ERROR, APIError
from nudging_core.jsonio import dump_json

from .errors import error_response
from .observability import note_stream_error
from .sse import DONE, data_event


def shutting_down() -> APIError:
    return APIError(
        503, "The server is shutting down; retry the request.", type=SERVER_ERROR, code="server_shutting_down"
    )


def _final_events() -> bytes:
    return data_event(dump_json(shutting_down().to_dict())) + DONE


class EndRequestsOnShutdown:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = event_stream = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, finished, event_stream
            if message["type"] == "http.response.start":
                started = True
                content_type = Headers(raw=message.get("headers", [])).get("content-type", "")
                event_stream = content_type.startswith("text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # Only uvicorn's shutdown deadline cancels a request's task (a client that leaves
            # is seen through `receive`). Once the response is complete the request has ended
            # as it should, so the cancellation is not passed on (uvicorn would log it as a crash).
            if finished or (started and not event_stream):
                raise
            if started:
                await send({"type": "http.response.body", "body": _final_events(), "more_body": False})
                note_stream_error()
            else:
                await error_response(shutting_down())(scope, receive, send)
