"""Async client for one completions upstream, whatever its dialect.

One pooled httpx client per upstream, a bound on requests in flight, and streams whose
early exit closes the HTTP response: vLLM aborts a request when its client disconnects,
so leaving a stream is how the proxy cancels upstream work it no longer needs.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any, TypeVar

import httpx
from pydantic import ConfigDict, Field

from nudging_core.jsonio import load_json
from nudging_core.types import Completion

from .bounded import OverLimit, bounded_lines, read_bounded
from .call import CompletionCall
from .dialects import DIALECTS, Dialect, Parser, Reply, Request, detect
from .errors import (
    ContextFull,
    ContextOverflow,
    NoChatTemplate,
    UpstreamBusy,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from .health import ReplicaHealth
from .protocol import StreamProgress

T = TypeVar("T")

CONTEXT_OVERFLOW_MARKERS = ("maximum context length", "context length", "exceeds the available context")
# vLLM 0.32 shortens max_tokens to the room the context leaves; with none left it says this
# (the proxy itself never asks for 0 tokens).
CONTEXT_FULL_MARKERS = ("max_tokens must be at least 1, got 0",)

# Told about every upstream request once its response headers arrived or it failed:
# (role, outcome, seconds), the outcome an HTTP status, "timeout", "unreachable" or "cancelled".
UpstreamObserver = Callable[[str, str, float], None]


@dataclass(frozen=True, slots=True)
class RequestScope:
    """What the server tells upstream calls about the client request they serve. A ContextVar
    carries it, so no signature between the server and `_send` has to."""

    request_id: str | None = None
    observer: UpstreamObserver | None = None
    _numbers: Iterator[int] = field(default_factory=itertools.count)
    _nonce: str = field(default_factory=lambda: secrets.token_hex(4))

    def upstream_request_id(self) -> str | None:
        """The X-Request-Id of one upstream request: the client request's id, a nonce and a
        number. vLLM makes the header its engine's request id, which must be unique among
        running requests: one client request sends many (concurrent probes, say), and two
        clients may send the same id at once (a retry, a fixed id)."""
        if self.request_id is None:
            return None
        return f"{self.request_id}-{self._nonce}-{next(self._numbers)}"


NO_REQUEST_SCOPE = RequestScope()
request_scope: ContextVar[RequestScope] = ContextVar("request_scope", default=NO_REQUEST_SCOPE)


Seconds = Annotated[float, Field(gt=0)]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """An upstream's timeouts; the configuration's `timeouts` section validates into this."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    connect: Seconds = 5.0
    read: Annotated[float, Field(gt=0, description="also the longest wait between two stream events")] = 60.0
    first_byte: Annotated[
        float, Field(gt=0, description="from sending a request until its response headers")
    ] = 60.0
    write: Seconds = 10.0
    pool: Seconds = 60.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.pool)


MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AnswerCaps:
    """The most of an upstream's answer the proxy buffers; a larger one is a failed answer.

    A JSON body's largest legitimate size is an `echo` with the prompt's logprobs: with
    vLLM's top-20 (`--max-logprobs` 20) about 700 bytes per prompt token, some 45 MiB for a
    64k-token prompt. A streamed event is a few KiB but for the first event of such an echo,
    which carries the prompt's logprobs too.
    """

    body: int = 64 * MIB  # a whole JSON answer
    event: int = 16 * MIB  # one line of a stream (vLLM sends each event as one `data:` line)


@contextmanager
def _read_failures(role: str, *, streamed: bool) -> Iterator[None]:
    """A failed read of an answer (whole, or a stream's events) as the upstream error it is."""
    try:
        yield
    except OverLimit as exc:
        # Like a malformed answer: the upstream's fault, not worth a retry, no reason to skip it.
        what, setting = (("one stream event", "max_event_bytes") if streamed
                         else ("its body", "max_answer_bytes"))
        raise UpstreamError(role, f"answer too large: {what} is over {exc.limit} bytes ({setting})") from None
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(role, "timed out mid-stream" if streamed else "timed out") from exc
    except httpx.HTTPError as exc:
        what = "stream" if streamed else "answer"
        raise UpstreamUnreachable(role, f"{what} interrupted ({type(exc).__name__})") from exc


def _error_message(response_text: str) -> str:
    try:
        payload = load_json(response_text)
    except ValueError:
        return response_text[:200] or "empty error body"
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error)[:500]
    return str(error)[:500]


def _raise_for_status(role: str, status: int, body_text: str) -> None:
    if status < 400:
        return
    message = _error_message(body_text)
    lowered = message.lower()
    if status == 400 and any(marker in lowered for marker in CONTEXT_FULL_MARKERS):
        raise ContextFull(role, message, status_code=status)
    if status == 400 and any(marker in lowered for marker in CONTEXT_OVERFLOW_MARKERS):
        raise ContextOverflow(role, message, status_code=status)
    raise UpstreamError(role, f"HTTP {status}: {message}", status_code=status)


def _raise_stream_error(role: str, data: str, payload: dict[str, Any]) -> None:
    """An error event inside a stream. vLLM checks some fields only once its stream has
    started (`logprobs` over `--max-logprobs`: HTTP 200, then `{"error": {..., "code": 400}}`),
    so the event's code is the status the request would have had."""
    error = payload.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 600:
        _raise_for_status(role, code, data)
    raise UpstreamError(role, f"stream error: {_error_message(data)}")


class UpstreamClient:
    """A pooled connection to one upstream serving one model."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        role: str,
        api_key: str | None = None,
        dialect: str = "auto",
        timeouts: Timeouts = Timeouts(),
        caps: AnswerCaps = AnswerCaps(),
        max_in_flight: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        health: ReplicaHealth | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.model = model
        self.role = role
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/",
            headers=headers,
            timeout=timeouts.to_httpx(),
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight),
            transport=transport,
        )
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._pool = timeouts.pool
        self._first_byte = timeouts.first_byte
        self.caps = caps
        # Failures below HTTP are seen by the replica's transport; a wait for headers that runs
        # out is ours to report.
        self._health = health
        self._dialect: Dialect | None = None if dialect == "auto" else DIALECTS[dialect]()
        self._detecting = asyncio.Lock()
        # Reads and closes finishing in the background (see `_in_background`).
        self._background: set[asyncio.Future[Any]] = set()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def dialect(self) -> Dialect:
        """The configured dialect, or the one `/v1/models` reveals (asked once)."""
        if self._dialect is None:
            async with self._detecting:
                if self._dialect is None:
                    self._dialect = detect(await self._json(Request("models", None), "GET"))
        return self._dialect

    async def _send(self, request: Request, method: str = "POST") -> httpx.Response:
        """Send a request and return once its headers arrived (the body is still to be read).

        A send cancelled while its connection is being set up would leave that connection
        stuck in httpcore's pool (encode/httpcore#1093) until the pool is full; so a send
        cancelled before its request was written finishes in the background and its response
        is closed at once. Once the request is written, httpcore closes the connection of a
        cancelled send cleanly, so it is cancelled at once: the upstream sees its client leave
        without waiting for the headers (which a non-streamed answer sends only at its end).
        """
        scope = request_scope.get()
        upstream_request_id = scope.upstream_request_id()
        headers = {"X-Request-Id": upstream_request_id} if upstream_request_id else None
        written = asyncio.Event()

        async def trace(event: str, info: dict[str, Any]) -> None:
            if event.endswith("receive_response_headers.started"):
                written.set()

        wire = self._http.build_request(method, request.path, json=request.body, headers=headers,
                                        extensions={"trace": trace})
        sending = asyncio.ensure_future(self._http.send(wire, stream=True))
        started, outcome = time.perf_counter(), "cancelled"
        try:
            async with asyncio.timeout(self._first_byte):
                try:
                    response = await asyncio.shield(sending)
                except asyncio.CancelledError:
                    sending.add_done_callback(self._discard)  # closes a response that came anyway
                    if written.is_set():
                        sending.cancel()
                    raise
            outcome = str(response.status_code)
            return response
        except TimeoutError as exc:
            outcome = "timeout"
            if self._health is not None:
                self._health.failed()
            raise UpstreamTimeout(self.role, f"no response within {self._first_byte:g} s") from exc
        except httpx.TimeoutException as exc:
            outcome = "timeout"
            raise UpstreamTimeout(self.role, "timed out") from exc
        except httpx.HTTPError as exc:
            outcome = "unreachable"
            known = self._health.down if self._health is not None else None
            reason = f"unreachable ({type(exc).__name__})" + (f"; {known}" if known else "")
            raise UpstreamUnreachable(self.role, reason) from exc
        finally:
            if scope.observer is not None:
                scope.observer(self.role, outcome, time.perf_counter() - started)

    def _discard(self, sending: asyncio.Future[httpx.Response]) -> None:
        if sending.cancelled() or sending.exception() is not None:
            return
        self._in_background(sending.result().aclose())

    def _in_background(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Run `work` in a task of its own, which nobody cancels.

        A response read or closed by a task that is being cancelled does not always give its
        connection back to httpcore's pool (the fault tests saw connections left active until
        the pool was full); so reads and closes run here, and a cancelled caller leaves them
        to finish in the background.
        """
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # a failure nobody waits for any more is not worth a warning

    async def _close_response(self, response: httpx.Response) -> None:
        await asyncio.shield(self._in_background(response.aclose()))

    async def _read(self, response: httpx.Response) -> bytes:
        try:
            with _read_failures(self.role, streamed=False):
                return await read_bounded(response.aiter_bytes(), self.caps.body)
        finally:
            await response.aclose()

    async def _json(self, request: Request, method: str = "POST") -> Any:
        response = await self._send(request, method)
        body = await asyncio.shield(self._in_background(self._read(response)))
        text = body.decode("utf-8", "replace")
        _raise_for_status(self.role, response.status_code, text)
        try:
            return load_json(text)
        except ValueError as exc:
            raise UpstreamError(self.role, "malformed JSON answer") from exc

    async def _take_slot(self) -> None:
        """One of the in-flight slots, waited for at most `pool` seconds: clients that hold
        every slot (streams nobody reads, say) must not keep the next request waiting forever."""
        try:
            async with asyncio.timeout(self._pool):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamBusy(
                self.role, f"all {self._max_in_flight} request slots stayed busy for {self._pool:g} s"
            ) from None

    async def complete(self, call: CompletionCall) -> Completion:
        dialect = await self.dialect()
        parse = dialect.parser(self.role, need_logprobs=call.logprobs is not None, stream=False)
        await self._take_slot()
        try:
            reply = parse(await self._json(dialect.completion(call, self.model, stream=False)))
        finally:
            self._slots.release()
        return Completion(tuple(reply.tokens), reply.finish_reason, reply.prompt_tokens)

    def stream(self, call: CompletionCall, *, slot_taken: asyncio.Event | None = None) -> CompletionStream:
        """A streamed completion; `slot_taken` is set once it holds one of the in-flight slots."""
        return CompletionStream(self, call, slot_taken)

    async def open_stream(
        self, call: CompletionCall, slot_taken: asyncio.Event | None = None
    ) -> tuple[httpx.Response, Parser]:
        """Send a streamed completion and return once its headers arrived, with the parser of
        its events. It holds one in-flight slot until `close_stream`; an error status raises
        (and gives the slot back)."""
        dialect = await self.dialect()
        parse = dialect.parser(self.role, need_logprobs=call.logprobs is not None, stream=True)
        return await self._open(dialect.completion(call, self.model, stream=True), slot_taken), parse

    async def _open(self, wire: Request, slot_taken: asyncio.Event | None = None) -> httpx.Response:
        """Send a streamed request and return once its headers arrived, holding one in-flight
        slot until `close_stream`; an error status raises (and gives the slot back)."""
        await self._take_slot()
        if slot_taken is not None:
            slot_taken.set()
        try:
            response = await self._send(wire)
        except BaseException:
            self._slots.release()
            raise
        if response.status_code >= 400:
            try:
                body = (await asyncio.shield(self._in_background(self._read(response)))).decode(
                    "utf-8", "replace")
            except UpstreamError:
                body = ""  # the status says enough
            finally:
                await self.close_stream(response)  # also when cancelled: the slot and the connection go back
            _raise_for_status(self.role, response.status_code, body)
        return response

    async def close_stream(self, response: httpx.Response) -> None:
        """Close a stream `open_stream` opened and give its slot back."""
        try:
            await self._close_response(response)
        finally:
            self._slots.release()

    def _chat_request(self, body: dict[str, Any]) -> Request:
        return Request("chat/completions", {**body, "model": self.model})

    async def chat(self, body: dict[str, Any]) -> Any:
        """The upstream's own answer to the chat request `body` (its `model` becomes this
        upstream's), whole."""
        await self._take_slot()
        try:
            with self._template_errors():
                return await self._json(self._chat_request(body))
        finally:
            self._slots.release()

    async def open_chat_stream(self, body: dict[str, Any]) -> httpx.Response:
        """The streamed answer to the chat request `body`, once its headers arrived; read it
        with `stream_events`, close it with `close_stream`."""
        with self._template_errors():
            return await self._open(self._chat_request(body))

    @contextmanager
    def _template_errors(self) -> Iterator[None]:
        """The upstream's refusal to render a chat for want of a template, as `NoChatTemplate`:
        vLLM says "... default chat template is no longer allowed, so you must provide a chat
        template if the tokenizer does not define one." (a configuration error, not the client's)."""
        try:
            yield
        except UpstreamError as error:
            if error.status_code == 400 and "chat template" in error.message.lower():
                raise NoChatTemplate(self.role, error.message, status_code=error.status_code) from None
            raise

    async def stream_events(self, response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
        """A stream's events as the upstream sent them, up to its [DONE] or its end (llama-server
        sends none); an error event raises."""
        with _read_failures(self.role, streamed=True):
            async for line in bounded_lines(response.aiter_bytes(), self.caps.event):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    payload = load_json(data)
                except ValueError as exc:
                    raise UpstreamError(self.role, "malformed stream event") from exc
                if not isinstance(payload, dict):
                    raise UpstreamError(self.role, "malformed stream event")
                if "error" in payload:
                    _raise_stream_error(self.role, data.decode("utf-8", "replace"), payload)
                yield payload

    async def count_tokens(self, prompt: str) -> int | None:
        """Prompt size by the upstream's own tokenizer, if it offers one."""
        try:
            dialect = await self.dialect()
            return dialect.token_count(await self._json(dialect.tokenize(self.model, prompt)))
        except UpstreamError:
            return None

    async def forward(self, path: str, body: dict[str, Any] | None) -> Any:
        """The upstream's JSON answer at `path` beside its API root (vLLM's `/tokenize`, say):
        `body` POSTed, or a GET without one."""
        return await self._json(Request(f"../{path}", body), "GET" if body is None else "POST")

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        """The chat rendered by the upstream's own template, if it can render one."""
        dialect = await self.dialect()
        with self._template_errors():
            return await dialect.render_chat(self._json, self.model, messages)

    async def detokenize(self, tokens: list[int]) -> str | None:
        """The text of token ids by the upstream's own tokenizer; None where it has no
        detokenizer (its dialect's, or the endpoint answers 404)."""
        dialect = await self.dialect()
        try:
            return await dialect.detokenize(self._json, self.model, tokens)
        except UpstreamError as error:
            if error.status_code == 404:
                return None
            raise

    async def ready(self) -> bool:
        """Whether `/v1/models` answers 200; its body is read under the JSON cap, so an upstream
        that sends an endless one is not ready rather than a growing buffer."""
        try:
            async with self._http.stream("GET", "models") as response:
                await read_bounded(response.aiter_bytes(), self.caps.body)
        except (httpx.HTTPError, OverLimit):
            return False
        return response.status_code == 200


class CompletionStream(StreamProgress):
    """A streamed completion: iterate tokens; leaving the `async with` closes the request."""

    def __init__(
        self, client: UpstreamClient, call: CompletionCall, slot_taken: asyncio.Event | None
    ) -> None:
        self._client = client
        self._call = call
        self._slot_taken = slot_taken
        super().__init__()
        self._response: httpx.Response | None = None
        self._parse: Parser | None = None

    async def __aenter__(self) -> CompletionStream:
        self._response, self._parse = await self._client.open_stream(self._call, self._slot_taken)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        response, self._response = self._response, None
        if response is not None:
            await self._client.close_stream(response)

    async def replies(self) -> AsyncGenerator[Reply, None]:
        """The stream's events, parsed (iterating the stream itself gives their tokens)."""
        assert self._response is not None and self._parse is not None, "use `async with` first"
        async with aclosing(self._client.stream_events(self._response)) as events:
            async for payload in events:
                reply = self._parse(payload)
                yield reply
                self.note(reply)
                if reply.last:
                    break
        self.end(self._client.role)
