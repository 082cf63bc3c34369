"""Server-sent events for streamed completions, OpenAI style.

The first event is awaited for a moment (`server.stream_open_seconds`) before the response
starts, so a request whose upstreams fail at once gets a proper HTTP error instead of a 200
followed by an error event. A first event that takes longer (a long first token, a loaded
upstream) does not hold the headers: they go out with an SSE comment, so clients see the
stream open, and a failure after that is an error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from nudging_core.errors import APIError
from nudging_core.jsonio import dump_json
from nudging_core.service import ChoiceFinished, ErrorEvent, Event, PieceEvent, UsageEvent

from .observability import note_stream_error
from .responses import Shape
from .sse import DONE, EventStreamResponse, comment, data_event


def _data(payload: dict[str, Any]) -> bytes:
    return data_event(dump_json(payload))


async def _settle(first: asyncio.Future[Event | None]) -> None:
    """Cancel the wait for the first event, if still waiting, and let it end: the events can
    only be closed once nothing is reading them."""
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def _chunks(
    shape: Shape, indexes: list[int], first: asyncio.Future[Event | None],
    events: AsyncGenerator[Event, None],
) -> AsyncGenerator[bytes, None]:
    async with aclosing(events):
        try:
            if not first.done():
                yield comment("ok")  # the stream is open; its first event is on its way
            head = await first
        finally:
            await _settle(first)
        for chunk in shape.opening_chunks(indexes):
            yield _data(chunk)
        pending = [head] if head is not None else []
        while True:
            event = pending.pop() if pending else await anext(events, None)
            if event is None:
                break
            if isinstance(event, PieceEvent):
                if event.piece.text or event.piece.logprobs:
                    yield _data(shape.text_chunk(event.choice.index, event.piece))
            elif isinstance(event, ChoiceFinished):
                yield _data(shape.final_chunk(event.choice))
            elif isinstance(event, ErrorEvent):
                note_stream_error()  # also a first event's, when the stream opened before it
                yield _data(event.error.to_dict())
                break
            elif isinstance(event, UsageEvent) and shape.include_usage:
                yield _data(shape.usage_chunk(event))
        yield DONE


async def stream_response(
    shape: Shape, indexes: list[int], events: AsyncGenerator[Event, None], *, send_timeout: float,
    open_within: float,
) -> EventStreamResponse:
    """Start the stream once the first event is known, or `open_within` seconds have passed;
    an error before that raises.

    A send (an event or a ping) that waits `send_timeout` seconds for the client to read ends
    the response: the events are closed, which cancels their upstream requests and gives their
    slots back, and the server drops the connection."""
    first: asyncio.Future[Event | None] = asyncio.ensure_future(anext(events, None))
    try:
        await asyncio.wait({first}, timeout=open_within)
        head = first.result() if first.done() else None
        if isinstance(head, ErrorEvent):
            raise head.error
    except BaseException:
        await _settle(first)
        await events.aclose()
        raise
    return EventStreamResponse(_chunks(shape, indexes, first, events), send_timeout=send_timeout)


async def _forwarded(first: dict[str, Any] | None, chunks: AsyncGenerator[dict[str, Any] | APIError, None],
                     ) -> AsyncGenerator[bytes, None]:
    async with aclosing(chunks):
        chunk: dict[str, Any] | APIError | None = first
        while chunk is not None:
            yield _data(chunk.to_dict() if isinstance(chunk, APIError) else chunk)
            if isinstance(chunk, APIError):
                break
            chunk = await anext(chunks, None)
        yield DONE


async def forwarded_stream_response(
    chunks: AsyncGenerator[dict[str, Any] | APIError, None], *, send_timeout: float
) -> EventStreamResponse:
    """An upstream's own stream chunks (a chat passthrough's), started as `stream_response`
    starts its stream: an error before the first chunk raises."""
    try:
        first = await anext(chunks, None)
    except BaseException:
        await chunks.aclose()
        raise
    if isinstance(first, APIError):
        await chunks.aclose()
        raise first
    return EventStreamResponse(_forwarded(first, chunks), send_timeout=send_timeout)
