"""Server-sent events for streamed completions, OpenAI style.

The first event is awaited before the response starts, so a request whose upstreams fail
at once gets a proper HTTP error instead of a 200 followed by an error event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

from sse_starlette import EventSourceResponse

from nudging_core.service import ChoiceFinished, ErrorEvent, Event, PieceEvent, UsageEvent

from .responses import Shape


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
    shape: Shape, indexes: list[int], events: AsyncGenerator[Event, None]
) -> EventSourceResponse:
    """Start the stream once the first event is known; an error before it raises."""
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()
        raise
    if isinstance(first, ErrorEvent):
        await events.aclose()
        raise first.error
    return EventSourceResponse(_chunks(shape, indexes, first, events), sep="\n", ping=15)
