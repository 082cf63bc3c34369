"""Connection-level defences, below the ASGI app: uvicorn's keep-alive deadline and connection
cap from the config, and deadlines on reading a request's head and its body.

uvicorn (h11 and httptools alike) only times out idle keep-alive connections, and stops even
that clock at a request's first byte: a client sending a request line, headers or a body a byte
at a time (slowloris) holds its connection, and a file descriptor, forever. The app never sees
an unfinished head, and waits for an unfinished body without a clock, so the guards are in the
HTTP protocol, for either parser. There too, the connection cap's 503 is OpenAI's JSON error
rather than uvicorn's plain text. And when the process runs out of file descriptors, asyncio's
accept errors are logged once per interval with their count, not one traceback each.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from nudging_core.config import ServerConfig
from nudging_core.errors import SERVER_ERROR, APIError

from .errors import error_response

connection_log = logging.getLogger("nudging_proxy.connections")
# asyncio's words when accept() fails for want of file descriptors (EMFILE, ENFILE) or memory.
ACCEPT_ERROR = "socket.accept() out of system resource"
ACCEPT_ERROR_LOG_INTERVAL_SECONDS = 10.0

# A connection or request ends soon; a client may as well try again then.
OVER_CAP_RETRY_AFTER_SECONDS = 1


def over_the_cap() -> APIError:
    return APIError(503, "The server is at its connection limit (max_connections); retry later.",
                    type=SERVER_ERROR, code="server_overloaded", retry_after=OVER_CAP_RETRY_AFTER_SECONDS)


class _ReadDeadlines:
    """Mixed into a uvicorn HTTP protocol: closes a connection whose next request head has not
    fully arrived `header_timeout` seconds after the connection opened or its last response
    ended, or whose request body has not fully arrived `body_timeout` seconds after its head."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    _body_watched: Any = None  # the request cycle whose body deadline is set
    # The protocol's own: a new request cycle starts when a request head has been parsed.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._start_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        # A head parsed here starts a new cycle (both parsers make it while reading data).
        if self.cycle is not None and self.cycle is not self._body_watched:
            self._body_watched = self.cycle
            self.loop.call_later(self.body_timeout, self._close_if_body_missing, self.cycle)

    def _close_if_body_missing(self, reading_cycle: Any) -> None:
        # `more_body` is the parser's: it turns false when the whole body has arrived, whether
        # or not the app has read it yet.
        if not self.transport.is_closing() and self.cycle is reading_cycle and reading_cycle.more_body:
            self.transport.close()

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


class _JSONOverCap:
    """Mixed into a uvicorn HTTP protocol: uvicorn's `limit_concurrency` (open connections or
    running requests), answered with a JSON 503, Retry-After and `Connection: close`."""

    limit_concurrency: int | None
    app: ASGIApp
    connections: set[Any]
    tasks: set[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The cap is checked here instead, so uvicorn's plain-text answer never goes out.
        self._cap, self.limit_concurrency = self.limit_concurrency, None
        self._app, self.app = self.app, self._capped_app

    async def _capped_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        # As uvicorn counts: this connection among the open ones, and (now that it runs) this
        # request's task among the running ones.
        cap = self._cap
        if cap is not None and (len(self.connections) >= cap or len(self.tasks) > cap):
            await error_response(over_the_cap(), {"Connection": "close"})(scope, receive, send)
            return
        await self._app(scope, receive, send)


def _parser(server: ServerConfig) -> str:
    """uvicorn's choice for `http: auto`: httptools where it can be imported."""
    if server.http != "auto":
        return server.http
    return "httptools" if importlib.util.find_spec("httptools") is not None else "h11"


def http_protocol(server: ServerConfig) -> type[asyncio.Protocol]:
    """The configured HTTP parser's uvicorn protocol, with the request-head and body deadlines
    and the connection cap's JSON 503."""
    base: type[asyncio.Protocol] = H11Protocol
    if _parser(server) == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    deadlines = {"header_timeout": server.header_timeout_seconds, "body_timeout": server.body_timeout_seconds}
    return type(f"Guarded{base.__name__}", (_ReadDeadlines, _JSONOverCap, base), deadlines)


def uvicorn_options(server: ServerConfig) -> dict[str, Any]:
    """The uvicorn settings the server config gives (beyond host, port and logging)."""
    return {
        "loop": server.loop,
        "http": http_protocol(server),
        "timeout_keep_alive": server.keep_alive_seconds,
        "limit_concurrency": server.max_connections,
    }


class AcceptErrorLog:
    """An event loop exception handler that logs accept errors at most once per `interval`
    with their count; everything else goes to the loop's default handler.

    asyncio retries every listening socket's whole backlog each second while descriptors are
    out, logging a traceback per attempt: a flood of connections became 114 MB of log in 20 s.
    """

    def __init__(self, interval: float = ACCEPT_ERROR_LOG_INTERVAL_SECONDS) -> None:
        self.interval = interval
        self._unlogged = 0
        self._quiet_until: asyncio.TimerHandle | None = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        self._unlogged += 1
        if self._quiet_until is None:
            self._log(loop, context.get("exception"))

    def _log(self, loop: asyncio.AbstractEventLoop, error: object) -> None:
        connection_log.warning("%s (%s): %d times since the last such line; new connections wait",
                               ACCEPT_ERROR, error, self._unlogged)
        self._unlogged = 0
        self._quiet_until = loop.call_later(self.interval, self._end_quiet, loop, error)

    def _end_quiet(self, loop: asyncio.AbstractEventLoop, error: object) -> None:
        self._quiet_until = None
        if self._unlogged:
            self._log(loop, error)


def install_accept_error_log() -> None:
    """Use `AcceptErrorLog` on the running loop (the server's, from the app's start-up)."""
    asyncio.get_running_loop().set_exception_handler(AcceptErrorLog())
