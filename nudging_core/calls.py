"""Upstream calls made on behalf of one generation: seeds, accounting, cancellation counts."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from nudging_core.types import Completion, GenerationStats, Role, SamplingParams, Token
from nudging_core.upstream import CompletionCall, Upstream, UpstreamStream
from nudging_core.upstream.dialects import Reply


def derive_seed(seed: int, choice_index: int, round_index: int, role: str) -> int:
    """A per-call seed, so runs repeat and rounds do not replay one random stream."""
    digest = hashlib.sha256(f"{seed}:{choice_index}:{round_index}:{role}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RoleCaller:
    """Calls one upstream in one role for one generation, counting what it does."""

    def __init__(
        self,
        client: Upstream,
        role: Role,
        stats: GenerationStats,
        sampling: SamplingParams,
        choice_index: int = 0,
        top_k: int = 1,
    ) -> None:
        self.client = client
        self.role: Role = role
        self._stats = stats
        self._sampling = sampling
        self._choice_index = choice_index
        # The logprobs per position nudging's calls ask for: the rule reads the base's top-1,
        # and a client asking for logprobs gets its k from the model that wrote each token.
        self.top_k = top_k

    def call(
        self,
        prompt: str | list[int],
        max_tokens: int,
        *,
        round_index: int,
        logprobs: int | None,
        stop: tuple[str, ...] = (),
        extra: dict[str, Any] | None = None,
        seed_as_sent: bool = False,
    ) -> CompletionCall:
        """One upstream request. Its seed is derived from the client's, unless `seed_as_sent`
        (a passthrough, whose first choice must be what the upstream gives for that seed)."""
        seed = self._sampling.seed
        if seed is not None and not (seed_as_sent and self._choice_index == 0):
            seed = derive_seed(seed, self._choice_index, round_index, self.role)
        return CompletionCall(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=self._sampling.temperature,
            top_p=self._sampling.top_p,
            seed=seed,
            logprobs=logprobs,
            stop=stop,
            extra=extra or {},
        )

    async def complete(
        self, prompt: str, max_tokens: int, *, round_index: int, logprobs: int | None = None
    ) -> Completion:
        """One whole completion, with `logprobs` per position (None: the caller's `top_k`)."""
        self._stats.upstream_requests[self.role] += 1
        top_k = self.top_k if logprobs is None else logprobs
        try:
            completion = await self.client.complete(
                self.call(prompt, max_tokens, round_index=round_index, logprobs=top_k)
            )
        except asyncio.CancelledError:
            self._stats.cancelled_requests[self.role] += 1
            raise
        self._stats.upstream_tokens[self.role] += len(completion.tokens)
        self._note_prompt_tokens(completion.prompt_tokens)
        return completion

    def _note_prompt_tokens(self, count: int | None) -> None:
        if count is not None:
            self._stats.prompt_tokens.setdefault(self.role, count)

    def stream(
        self, prompt: str, max_tokens: int, *, round_index: int, slot_taken: asyncio.Event | None = None
    ) -> AbstractAsyncContextManager[CountedStream]:
        return self.stream_call(
            self.call(prompt, max_tokens, round_index=round_index, logprobs=self.top_k), slot_taken
        )

    @asynccontextmanager
    async def stream_call(
        self, call: CompletionCall, slot_taken: asyncio.Event | None = None
    ) -> AsyncIterator[CountedStream]:
        self._stats.upstream_requests[self.role] += 1
        counted = CountedStream(self._stats, self.role)
        try:
            async with self.client.stream(call, slot_taken=slot_taken) as stream:
                counted.stream = stream
                yield counted
                self._note_prompt_tokens(stream.prompt_tokens)
        finally:
            if counted.stream is None or not counted.stream.completed:
                self._stats.cancelled_requests[self.role] += 1


class CountedStream:
    """Token iterator over a streamed completion that counts the tokens received."""

    def __init__(self, stats: GenerationStats, role: Role) -> None:
        self._stats = stats
        self._role: Role = role
        self.stream: UpstreamStream | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason if self.stream is not None else None

    @property
    def completion_tokens(self) -> int | None:
        return self.stream.completion_tokens if self.stream is not None else None

    @property
    def stop_reason(self) -> str | int | None:
        return self.stream.stop_reason if self.stream is not None else None

    @property
    def system_fingerprint(self) -> str | None:
        return self.stream.system_fingerprint if self.stream is not None else None

    async def __aiter__(self) -> AsyncGenerator[Token, None]:
        assert self.stream is not None
        async for token in self.stream:
            self._stats.upstream_tokens[self._role] += 1
            yield token

    async def replies(self) -> AsyncGenerator[Reply, None]:
        """The upstream's events whole (text and logprobs as it sent them)."""
        assert self.stream is not None
        async for reply in self.stream.replies():
            self._stats.upstream_tokens[self._role] += len(reply.tokens)
            yield reply
