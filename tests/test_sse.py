"""The SSE response on a real socket: events as they come, a ping when the stream is quiet,
and a client that leaves closes the events (and so their upstream requests) at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from server.sse import EventStreamResponse, data_event

from .servers import running


def _app(events: Callable[[], AsyncGenerator[bytes, None]], ping_seconds: float) -> Starlette:
    async def endpoint(request: Request) -> EventStreamResponse:
        return EventStreamResponse(events(), send_timeout=5, ping_seconds=ping_seconds)

    return Starlette(routes=[Route("/", endpoint)])


def test_events_go_out_as_sent_with_pings_while_the_stream_is_quiet() -> None:
    async def events() -> AsyncGenerator[bytes, None]:
        yield data_event(b'{"a":1}')
        await asyncio.sleep(0.9)
        yield data_event(b"[DONE]")

    with running(_app(events, ping_seconds=0.2)) as url:
        response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    blocks = response.text.split("\n\n")
    assert blocks[0] == 'data: {"a":1}' and blocks[-2:] == ["data: [DONE]", ""]
    pings = blocks[1:-2]
    assert 1 <= len(pings) <= 4 and set(pings) == {": ping"}, blocks


def test_no_ping_while_events_keep_coming() -> None:
    async def events() -> AsyncGenerator[bytes, None]:
        for index in range(10):
            await asyncio.sleep(0.05)
            yield data_event(str(index).encode())

    with running(_app(events, ping_seconds=0.4)) as url:
        response = httpx.get(url, timeout=10)
    assert response.text == "".join(f"data: {index}\n\n" for index in range(10))


def test_a_client_that_leaves_closes_the_events_at_once() -> None:
    closed = threading.Event()

    async def events() -> AsyncGenerator[bytes, None]:
        try:
            yield data_event(b"first")
            await asyncio.sleep(60)
            yield data_event(b"never")
        finally:
            closed.set()

    with running(_app(events, ping_seconds=15)) as url:
        with httpx.stream("GET", url, timeout=10) as response:
            assert next(response.iter_lines()) == "data: first"
        left = time.monotonic()
        assert closed.wait(5)
        assert time.monotonic() - left < 2
