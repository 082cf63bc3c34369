"""The upstream connections' network layer (`AsyncioTransport`), against a real TCP server.

The server is a plain asyncio one written here, so each test controls the bytes on the wire:
what httpx sees through our backend must be what it sees through its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from nudging_core.upstream.network import AsyncioTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)


@asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A server on a free port; yields its URL and a log of its connections (one entry each)."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return await reader.readexactly(length)


def _answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


async def _echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            body = await _read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(_answer(b"echo:" + body))
        await writer.drain()


async def test_answers_and_keep_alive_are_httpx_s_own() -> None:
    async with _server(_echo_forever) as (url, connections):
        ours = httpx.AsyncClient(transport=AsyncioTransport(LIMITS))
        async with ours, httpx.AsyncClient() as theirs:
            for client in (ours, theirs):
                first = await client.post(url, content=b"one")
                second = await client.post(url, content=b"two")
                assert (first.status_code, first.content, second.content) == (200, b"echo:one", b"echo:two")
    assert len(connections) == 2  # one per client: the second request reused the connection


async def test_a_streamed_body_arrives_chunk_by_chunk() -> None:
    sent = asyncio.Event()

    async def events(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await sent.wait()
            sent.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with _server(events) as (url, _), httpx.AsyncClient(transport=AsyncioTransport(LIMITS)) as client:
        async with client.stream("POST", url, content=b"{}") as response:
            received = []
            async for chunk in response.aiter_raw():
                received.append(chunk)
                sent.set()  # the next event is written only once this one was read
    assert received == [b"data: 1\n\n", b"data: 2\n\n"]


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_answer(b"ok:" + await _read_request(reader)))
        await writer.drain()  # then the connection closes, with no `connection: close`

    async with _server(answer_once) as (url, connections):
        async with httpx.AsyncClient(transport=AsyncioTransport(LIMITS)) as client:
            assert (await client.post(url, content=b"a")).content == b"ok:a"
            await asyncio.sleep(0.1)  # the close reaches the client
            assert (await client.post(url, content=b"b")).content == b"ok:b"
    assert len(connections) == 2


async def test_closing_a_stream_early_closes_its_connection() -> None:
    disconnected = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"9\r\ndata: x\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            disconnected.set()

    async with _server(endless) as (url, _), httpx.AsyncClient(transport=AsyncioTransport(LIMITS)) as client:
        async with client.stream("POST", url, content=b"{}") as response:
            async for _chunk in response.aiter_raw():
                break
        await asyncio.wait_for(disconnected.wait(), 5)


async def test_timeouts_and_refusals_are_httpx_s_errors() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(10)

    async with _server(silent) as (url, _):
        transport = AsyncioTransport(LIMITS)
        async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.2)) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(url, content=b"{}")
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(transport=AsyncioTransport(one),
                                     timeout=httpx.Timeout(5, pool=0.2)) as client:
            hung = asyncio.ensure_future(client.post(url, content=b"{}"))  # holds the only slot
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await client.post(url, content=b"{}")
            hung.cancel()
            with pytest.raises(asyncio.CancelledError):
                await hung
    async with _server(silent) as (url, _):
        pass  # the port is free again, and nothing listens on it
    async with httpx.AsyncClient(transport=AsyncioTransport(LIMITS)) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(url, content=b"{}")
