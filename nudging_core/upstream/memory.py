"""An upstream in this process, as httpx's `MockTransport` is a server: a handler answers each
completions request with its JSON events (one for a whole answer), which the dialect parses
as it parses a server's. Tests drive the algorithm through it without sockets; it counts
its in-flight slots, closes a stream its client leaves, and passes a caller's cancellation
into the handler (a request held back by the handler is then abandoned)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

from nudging_core.types import Completion

from .call import CompletionCall
from .dialects import Dialect, Parser, Reply
from .dialects.openai import OpenAICompletions
from .protocol import StreamProgress

# The request's JSON body -> its answer's JSON events. Whatever the handler awaits before its
# first event is the wait for the answer's headers; raising an `UpstreamError` fails the call.
Handler = Callable[[dict[str, Any]], AsyncIterator[dict[str, Any]]]


class MemoryUpstream:
    def __init__(
        self, handler: Handler, *, role: str, model: str = "memory", dialect: Dialect | None = None,
        max_in_flight: int = 64,
    ) -> None:
        self.url = f"memory://{role}"
        self.model = model
        self.role = role
        self._handler = handler
        self._dialect = dialect or OpenAICompletions()
        self.slots = asyncio.Semaphore(max_in_flight)

    def answer(self, call: CompletionCall, *, stream: bool) -> tuple[AsyncIterator[dict[str, Any]], Parser]:
        """The handler's events for `call`, not yet started, and the parser for them."""
        request = self._dialect.completion(call, self.model, stream=stream)
        parse = self._dialect.parser(self.role, need_logprobs=call.logprobs is not None, stream=stream)
        return self._handler(request.body or {}), parse

    async def complete(self, call: CompletionCall) -> Completion:
        events, parse = self.answer(call, stream=False)
        async with self.slots:
            try:
                reply = parse(await anext(events))
            finally:
                await _close(events)
        return Completion(tuple(reply.tokens), reply.finish_reason, reply.prompt_tokens)

    def stream(self, call: CompletionCall, *, slot_taken: asyncio.Event | None = None) -> MemoryStream:
        return MemoryStream(self, call, slot_taken)

    async def count_tokens(self, prompt: str) -> int | None:
        return None  # no tokenizer endpoint

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None:
        return None  # no chat template

    async def detokenize(self, tokens: list[int]) -> str | None:
        return None  # no tokenizer endpoint

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass


async def _close(events: AsyncIterator[dict[str, Any]]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


class MemoryStream(StreamProgress):
    def __init__(
        self, upstream: MemoryUpstream, call: CompletionCall, slot_taken: asyncio.Event | None
    ) -> None:
        super().__init__()
        self._upstream = upstream
        self._call = call
        self._slot_taken = slot_taken
        self._events: AsyncIterator[dict[str, Any]] | None = None
        self._first: dict[str, Any] | None = None
        self._parse: Parser | None = None

    async def __aenter__(self) -> MemoryStream:
        upstream = self._upstream
        events, self._parse = upstream.answer(self._call, stream=True)
        await upstream.slots.acquire()
        if self._slot_taken is not None:
            self._slot_taken.set()
        try:
            self._first = await anext(events, None)
        except BaseException:
            upstream.slots.release()
            await _close(events)
            raise
        self._events = events
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        events, self._events = self._events, None
        if events is not None:
            try:
                await _close(events)
            finally:
                self._upstream.slots.release()

    async def replies(self) -> AsyncIterator[Reply]:
        assert self._events is not None and self._parse is not None, "use `async with` first"
        payload, self._first = self._first, None
        while payload is not None:
            reply = self._parse(payload)
            yield reply
            self.note(reply)
            if reply.last:
                break
            payload = await anext(self._events, None)
        self.end(self._upstream.role)
