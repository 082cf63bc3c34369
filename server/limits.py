"""The body's framing and size limit (config `server.limits.max_body_bytes`): a body with two
lengths is a 400, one too large to read a 413, before anything parses it. The limits on a
parsed request's fields are the service's (nudging_core/service/limits.py)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nudging_core.errors import APIError

from .errors import error_response


def body_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the limit of {max_bytes} bytes (max_body_bytes).",
        code="request_too_large",
    )


def ambiguous_length() -> APIError:
    return APIError(
        400, "A request may not have both Content-Length and Transfer-Encoding.", code="ambiguous_length"
    )


def _has_both_lengths(headers: Headers) -> bool:
    # h11 goes by Transfer-Encoding; a front proxy going by Content-Length would see another
    # request boundary (request smuggling), so RFC 9112 lets a server reject such a request.
    return "content-length" in headers and "transfer-encoding" in headers


def _declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


class BodySizeLimit:
    """Refuses bodies over `max_bytes`. The body is read here, at most that much, and handed
    on in one piece; later reads go to the client's stream (disconnect detection needs it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if _has_both_lengths(headers):
            await error_response(ambiguous_length())(scope, receive, send)
            return
        declared = _declared_length(headers)
        if declared is not None and declared > self.max_bytes:
            await error_response(body_too_large(self.max_bytes))(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first = message  # the client left; the app sees that instead of a body
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await error_response(body_too_large(self.max_bytes))(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: Message = first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def buffered_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return replay
            return await receive()

        await self.app(scope, buffered_receive, send)
