"""Connection-level defences, below the ASGI app: uvicorn's keep-alive deadline and connection
cap from the config, and a deadline on reading a request's head.

uvicorn (with h11; httptools has no such setting either) only times out idle keep-alive
connections, and stops even that clock at a request's first byte: a client sending a request
line or headers a byte at a time (slowloris) holds its connection, and a file descriptor,
forever. The app never sees such a request, so the guard is in the HTTP protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from nudging_core.config import ServerConfig


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request head has not fully
    arrived `header_timeout` seconds after the connection opened or its last response ended."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_header_deadline()

    def _start_header_deadline(self) -> None:
        # `cycle` changes with each request head received, so a deadline set while waiting for
        # one head cannot close the connection during a later request.
        self.loop.call_later(self.header_timeout, self._close_if_head_missing, self.cycle)

    def _close_if_head_missing(self, waiting_cycle: object) -> None:
        if self.transport.is_closing() or self.cycle is not waiting_cycle:
            return
        if self.conn.their_state is h11.IDLE:
            self.transport.close()


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """The uvicorn settings the server config gives (beyond host, port and logging)."""
    protocol = type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,),
                    {"header_timeout": server.header_timeout_seconds})
    return {
        "http": protocol,
        "timeout_keep_alive": server.keep_alive_seconds,
        "limit_concurrency": server.max_connections,
    }
