"""Reading an upstream's answer under a cap: line splitting across chunks, and the cap itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.types import Receive, Scope, Send

from nudging_core.upstream import AnswerCaps, UpstreamClient
from nudging_core.upstream.bounded import OverLimit, bounded_lines, read_bounded

from .servers import running


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def lines(*chunks: bytes, limit: int = 100) -> list[bytes]:
    async def collect() -> list[bytes]:
        return [line async for line in bounded_lines(_chunks(*chunks), limit)]
    return asyncio.run(collect())


def test_lines_split_across_chunks_as_httpx_would() -> None:
    assert lines(b"data: 1\n\nda", b"ta: ", b"2\r\n\r\n", b"data: [DONE]") == [
        b"data: 1", b"", b"data: 2", b"", b"data: [DONE]"]
    assert lines(b"a\nb\n") == [b"a", b"b"]
    assert lines() == []


def test_a_line_over_the_cap_stops_the_read_at_its_chunk() -> None:
    assert lines(b"x" * 100 + b"\n", limit=100) == [b"x" * 100]
    with pytest.raises(OverLimit):
        lines(b"x" * 60, b"x" * 41 + b"\n", limit=100)
    with pytest.raises(OverLimit):
        lines(b"ok\n" + b"x" * 101 + b"\nnever read", limit=100)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"x" * 30

    async def first_line() -> None:
        async for _ in bounded_lines(endless(), 100):
            pass
    with pytest.raises(OverLimit):
        asyncio.run(first_line())


def test_a_body_over_the_cap() -> None:
    assert asyncio.run(read_bounded(_chunks(b"a" * 50, b"b" * 50), 100)) == b"a" * 50 + b"b" * 50
    with pytest.raises(OverLimit):
        asyncio.run(read_bounded(_chunks(b"a" * 50, b"b" * 51), 100))


def test_a_huge_models_body_is_not_ready() -> None:
    """`ready()` reads `/v1/models` under the JSON cap: an upstream that sends a far larger body
    (64 MiB here, against a 1 MiB cap) is not ready, and the proxy does not buffer it."""
    async def huge_models(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        for _ in range(1024):
            await send({"type": "http.response.body", "body": b" " * 65536, "more_body": True})
            await asyncio.sleep(0.001)
        await send({"type": "http.response.body", "body": b"{}"})

    async def check(url: str) -> bool:
        client = UpstreamClient(url + "/v1", "m", role="base", caps=AnswerCaps(body=1024 * 1024))
        try:
            return await asyncio.wait_for(client.ready(), 20)
        finally:
            await client.aclose()

    with running(huge_models) as url:
        assert asyncio.run(check(url)) is False
