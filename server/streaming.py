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

from nudging_core.upstream import UpstreamError

from .errors import upstream_error_body
from .responses import Shape
from .runs import ChoiceRun, PieceEvent


def _data(payload: dict[str, Any] | str) -> dict[str, str]:
    return {"data": payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}


async def _chunks(
    shape: Shape, runs: list[ChoiceRun], first: PieceEvent | None, events: AsyncGenerator[PieceEvent, None],
    include_usage: bool,
) -> AsyncIterator[dict[str, str]]:
    async with aclosing(events):
        if shape.chat:
            for run in runs:
                yield _data(shape.role_chunk(run.index))
        try:
            pending = [first] if first is not None else []
            while True:
                event = pending.pop() if pending else await anext(events, None)
                if event is None:
                    break
                if event.piece is None:
                    yield _data(shape.final_chunk(event.run))
                elif event.piece.text or event.piece.logprobs:
                    yield _data(shape.text_chunk(event.run.index, event.piece))
        except UpstreamError as error:
            yield _data(upstream_error_body(error))
            yield _data("[DONE]")
            return
        if include_usage:
            yield _data(shape.usage_chunk(runs))
        yield _data("[DONE]")


async def stream_response(
    shape: Shape, runs: list[ChoiceRun], events: AsyncGenerator[PieceEvent, None], include_usage: bool
) -> EventSourceResponse:
    """Start the stream once the first event is known; upstream errors before it raise."""
    try:
        first = await anext(events, None)
    except BaseException:
        await events.aclose()
        raise
    return EventSourceResponse(_chunks(shape, runs, first, events, include_usage), sep="\n", ping=15)
