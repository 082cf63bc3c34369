"""What the core needs of an upstream: the `Upstream` protocol, which the HTTP client
(client.py) and the in-memory one (memory.py) both satisfy, and the bookkeeping every
streamed completion shares."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from nudging_core.types import Completion, Token

from .call import CompletionCall
from .dialects import Reply
from .errors import UpstreamError


class StreamProgress(ABC):
    """What a stream's events said so far: its finish reason and usage, and whether it ended.
    Iterating the stream gives its events' tokens."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.stop_reason: str | int | None = None
        self.system_fingerprint: str | None = None
        self.completed = False

    def note(self, reply: Reply) -> None:
        self.finish_reason = reply.finish_reason or self.finish_reason
        self.prompt_tokens = reply.prompt_tokens or self.prompt_tokens
        self.completion_tokens = reply.completion_tokens or self.completion_tokens
        if reply.finish_reason:
            self.stop_reason = reply.stop_reason
        self.system_fingerprint = reply.system_fingerprint or self.system_fingerprint

    @abstractmethod
    def replies(self) -> AsyncIterator[Reply]:
        """The stream's events, parsed."""

    def __aiter__(self) -> AsyncIterator[Token]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[Token]:
        async for reply in self.replies():
            for token in reply.tokens:
                yield token

    def end(self, role: str) -> None:
        if self.finish_reason is None:
            raise UpstreamError(role, "stream ended without a finish reason")
        self.completed = True


class UpstreamStream(AbstractAsyncContextManager["UpstreamStream"], Protocol):
    """A streamed completion: entered once its answer started; iterate tokens or `replies()`."""

    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    stop_reason: str | int | None
    system_fingerprint: str | None
    completed: bool

    def __aiter__(self) -> AsyncIterator[Token]: ...

    def replies(self) -> AsyncIterator[Reply]: ...


class Upstream(Protocol):
    """One upstream serving one model in one role."""

    url: str
    model: str
    role: str

    async def complete(self, call: CompletionCall) -> Completion: ...

    def stream(self, call: CompletionCall, *, slot_taken: asyncio.Event | None = None) -> UpstreamStream: ...

    async def count_tokens(self, prompt: str) -> int | None: ...

    async def render_chat(self, messages: list[dict[str, str]]) -> str | None: ...

    async def detokenize(self, tokens: list[int]) -> str | None: ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...
