"""A server-sent events response that writes its events straight to the ASGI server.

Each event is one `send` and nothing else on the way: this runs for every streamed token. The
send timeout and the keep-alive ping are one watchdog per stream, checking a timestamp, not a
timer per send; a client that leaves is seen by one task waiting on `receive`. Either ends the
stream by cancelling it, which closes its events (and so their upstream requests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

stream_log = logging.getLogger("nudging_proxy.stream")

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),  # nginx would otherwise buffer the events
]
PING_SECONDS = 15.0
PING = b": ping\n\n"


def data_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


# OpenAI's last event of a stream.
DONE = data_event(b"[DONE]")


def comment(text: str) -> bytes:
    return b": " + text.encode() + b"\n\n"


class EventStreamResponse(Response):
    """Sends `events` (each an encoded SSE event) until they end, the client leaves, or a send
    waits `send_timeout` seconds for the client to read; pings every `ping_seconds` of quiet.
    A Starlette response (so routes return it as such), with no body of its own."""

    def __init__(self, events: AsyncGenerator[bytes, None], *, send_timeout: float,
                 ping_seconds: float = PING_SECONDS) -> None:
        self.status_code = 200
        self.raw_headers = list(HEADERS)
        self.background: BackgroundTask | None = None
        self._events = events
        self._send_timeout = send_timeout
        self._ping_seconds = ping_seconds
        self._clock = asyncio.get_running_loop().time
        # When the oldest send still waiting on the client began (None: none waits).
        self._sending_since: float | None = None
        self._sends = 0
        self._last_sent = self._clock()
        self._ended_by: str | None = None  # why the stream was cut short: "disconnect", "timeout"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.current_task()
        assert stream is not None
        watchers = [asyncio.ensure_future(self._until_disconnect(receive, stream)),
                    asyncio.ensure_future(self._watch(send, stream))]
        try:
            await self._stream(send)
        except asyncio.CancelledError:
            if self._ended_by is None or stream.uncancel() > 0:
                raise  # cancelled by the server (its shutdown deadline), not by a watcher
            if self._ended_by == "timeout":
                # Returning with the response unfinished makes the server close the connection.
                stream_log.warning("the client read nothing for %g s: its stream is ended",
                                   self._send_timeout)
        finally:
            self._ended_by = self._ended_by or "done"  # the watchers cancel nothing any more
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _stream(self, send: Send) -> None:
        await self._send(send, {"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
        try:
            async for event in self._events:
                await self._send(send, {"type": "http.response.body", "body": event, "more_body": True})
        finally:
            # Cut short in a send, the events wait at a `yield`: closing them runs their
            # cleanup (cancelling upstream requests) now, not whenever they are collected.
            await self._events.aclose()
        await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, message: dict[str, object]) -> None:
        self._sends += 1
        if self._sending_since is None:
            self._sending_since = self._clock()
        try:
            await send(message)
        finally:
            self._sends -= 1
            if not self._sends:
                self._sending_since = None
            self._last_sent = self._clock()

    def _end(self, stream: asyncio.Task[object], reason: str) -> None:
        if self._ended_by is None:
            self._ended_by = reason
            stream.cancel()

    async def _until_disconnect(self, receive: Receive, stream: asyncio.Task[object]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._end(stream, "disconnect")

    async def _watch(self, send: Send, stream: asyncio.Task[object]) -> None:
        """Ends the stream when a send has waited `send_timeout`; pings when it has been quiet
        for `ping_seconds`. A ping is a send of its own, so the watch goes on while it waits."""
        tick = min(1.0, self._send_timeout / 4, self._ping_seconds / 4)
        pings: set[asyncio.Task[None]] = set()
        try:
            while self._ended_by is None:
                await asyncio.sleep(tick)
                now = self._clock()
                if self._sending_since is not None:
                    if now - self._sending_since >= self._send_timeout:
                        self._end(stream, "timeout")
                elif now - self._last_sent >= self._ping_seconds:
                    ping = asyncio.create_task(
                        self._send(send, {"type": "http.response.body", "body": PING, "more_body": True}))
                    pings.add(ping)
                    ping.add_done_callback(lambda done: _forget(pings, done))
        finally:
            for ping in list(pings):
                ping.cancel()


def _forget(pings: set[asyncio.Task[None]], ping: asyncio.Task[None]) -> None:
    pings.discard(ping)
    if not ping.cancelled():
        ping.exception()  # a ping to a client that is gone fails; the stream ends anyway
