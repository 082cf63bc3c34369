"""Input limits (config `server.limits`): the body's size, then each field of a parsed request.

A request over a limit gets a 400 naming the field (`param`), except a body too large to
read, which is a 413 before anything parses it. The `max_tokens` cap is per model
(`max_tokens_limit`) and checked where the budget is chosen (server/runs.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import LimitsConfig
from .errors import APIError, invalid_request
from .protocol import ChatCompletionRequest, CompletionRequest


def body_too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The request body is larger than the limit of {max_bytes} bytes (max_body_bytes).",
        code="request_too_large",
    )


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
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
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await body_too_large(self.max_bytes).to_response()(scope, receive, send)
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
                await body_too_large(self.max_bytes).to_response()(scope, receive, send)
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


def _too_many(param: str, count: int, limit: int, what: str) -> APIError:
    return invalid_request(f"'{param}' has {count} {what}; the limit is {limit}.", param)


def _too_long(param: str, size: int, limit: int) -> APIError:
    return invalid_request(f"'{param}' is {size} characters long; the limit is {limit}.", param)


def _content_chars(message: Mapping[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part["text"]) for part in content if isinstance(part.get("text"), str))
    return 0


def _prompt_chars(prompt: str | list[str] | list[int] | list[list[int]]) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(item) if isinstance(item, (str, list)) else 1 for item in prompt)


def check_limits(request: CompletionRequest | ChatCompletionRequest, limits: LimitsConfig) -> None:
    """Raise a 400 naming the first field of `request` over one of `limits`."""
    if request.n > limits.max_n:
        raise invalid_request(f"'n' must be at most {limits.max_n}.", "n")
    stops = request.stop_list()
    if len(stops) > limits.max_stop:
        raise _too_many("stop", len(stops), limits.max_stop, "stop strings")
    for stop in stops:
        if len(stop) > limits.max_stop_chars:
            raise _too_long("stop", len(stop), limits.max_stop_chars)
    if request.nudging is not None and request.nudging.nudging_prompt is not None:
        size = len(request.nudging.nudging_prompt)
        if size > limits.max_prompt_chars:
            raise _too_long("nudging.nudging_prompt", size, limits.max_prompt_chars)
    if isinstance(request, CompletionRequest):
        size = _prompt_chars(request.prompt)
        if size > limits.max_prompt_chars:
            raise _too_long("prompt", size, limits.max_prompt_chars)
        return
    if len(request.messages) > limits.max_messages:
        raise _too_many("messages", len(request.messages), limits.max_messages, "messages")
    total = 0
    for index, message in enumerate(request.messages):
        size = _content_chars(message)
        if size > limits.max_message_chars:
            raise _too_long(f"messages.{index}.content", size, limits.max_message_chars)
        total += size
    if total > limits.max_prompt_chars:
        raise invalid_request(
            f"The messages have {total} characters together; the limit is {limits.max_prompt_chars}.",
            "messages",
        )
