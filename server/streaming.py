"""Server-sent events for streamed completions, OpenAI style.

The first event is awaited before the response starts, so a request whose upstreams fail
at once gets a proper HTTP error instead of a 200 followed by an error event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from nudging_core.service import ChoiceFinished, ErrorEvent, Event, PieceEvent, UsageEvent

from .responses import Shape

stream_log = logging.getLogger("nudging_proxy.stream")


class _ClientPacedResponse(EventSourceResponse):
    """An SSE response that a client which stops reading ends with one warning: the send
    timeout's exception would reach the server as a traceback per such client."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            # Returning with the response unfinished makes the server close the connection.
            stream_log.warning("the client read nothing for %g s: its stream is ended", self.send_timeout)


def _data(payload: dict[str, Any] | str) -> dict[str, str]:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}


async def _chunks(
    shape: Shape, indexes: list[int], first: Event | None, events: AsyncGenerator[Event, None],
) -> AsyncIterator[dict[str, str]]:
    async with aclosing(events):
        for chunk in shape.opening_chunks(indexes):
            yield _data(chunk)
        pending = [first] if first is not None else []
        while True:
            event = pending.pop() if pending else await anext(events, None)
            if event is None:
                break
            if isinstance(event, ErrorEvent):
                yield _data(event.error.to_dict())
                break
            if isinstance(event, ChoiceFinished):
                yield _data(shape.final_chunk(event.choice))
            elif isinstance(event, PieceEvent):
                if event.piece.text or event.piece.logprobs:
                    yield _data(shape.text_chunk(event.choice.index, event.piece))
            elif isinstance(event, UsageEvent) and shape.include_usage:
                yield _data(shape.usage_chunk(event))
        yield _data("[DONE]")


async def stream_response(
    shape: Shape, indexes: list[int], events: AsyncGenerator[Event, None], *, send_timeout: float
) -> EventSourceResponse:
    """Start the stream once the first event is known; an error before it raises.

    A send (an event or a ping) that waits `send_timeout` seconds for the client to read ends
    the response: the events are closed, which cancels their upstream requests and gives their
    slots back, and the server drops the connection."""
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()
        raise
    if isinstance(first, ErrorEvent):
        await events.aclose()
        raise first.error
    return _ClientPacedResponse(_chunks(shape, indexes, first, events), sep="\n", ping=15,
                               send_timeout=send_timeout)
