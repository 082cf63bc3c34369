"""Connection-level defences, below the ASGI app: uvicorn's keep-alive deadline and connection
cap from the config, and a deadline on reading a request's head.

uvicorn (h11 and httptools alike) only times out idle keep-alive connections, and stops even
that clock at a request's first byte: a client sending a request line or headers a byte at a
time (slowloris) holds its connection, and a file descriptor, forever. The app never sees such
a request, so the guard is in the HTTP protocol, for either parser.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from nudging_core.config import ServerConfig


class _HeadDeadline:
    """Mixed into a uvicorn HTTP protocol: closes a connection whose next request head has not
    fully arrived `header_timeout` seconds after the connection opened or its last response
    ended."""

    header_timeout: float = 10.0
    # The protocol's own: a new request cycle starts when a request head has been parsed.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._start_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._start_header_deadline()

    def _start_header_deadline(self) -> None:
        # `cycle` changes with each request head parsed, so a deadline set while waiting for
        # one head cannot close the connection during a later request.
        self.loop.call_later(self.header_timeout, self._close_if_head_missing, self.cycle)

    def _close_if_head_missing(self, waiting_cycle: Any) -> None:
        if self.transport.is_closing() or self.cycle is not waiting_cycle:
            return
        # The same cycle still running is a pipelined request (httptools parses ahead), not a
        # missing head.
        if waiting_cycle is None or waiting_cycle.response_complete:
            self.transport.close()


def _parser(server: ServerConfig) -> str:
    """uvicorn's choice for `http: auto`: httptools where it can be imported."""
    if server.http != "auto":
        return server.http
    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


def http_protocol(server: ServerConfig) -> type[asyncio.Protocol]:
    """The configured HTTP parser's uvicorn protocol, with the request-head deadline."""
    base: type[asyncio.Protocol] = H11Protocol
    if _parser(server) == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    return type(f"HeadDeadline{base.__name__}", (_HeadDeadline, base),
                {"header_timeout": server.header_timeout_seconds})


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """The uvicorn settings the server config gives (beyond host, port and logging)."""
    return {
        "loop": server.loop,
        "http": http_protocol(server),
        "timeout_keep_alive": server.keep_alive_seconds,
        "limit_concurrency": server.max_connections,
    }
