"""Strategy `fast`: the decisions of `paper`, with far fewer waits (docs/algorithm.md).

- The nudger's lookahead is streamed, and the base is probed at a word boundary as soon
  as the next word has begun, a window of boundaries at once.
- Each probe is a streamed request that can *be* the continuation: the first token decides
  the takeover; the winning probe's stream goes on as the base's continuation, so the base
  is already writing while the lookahead finishes; losing probes are closed at once.
- The continuation is judged by `paper`'s chunk rules on windows of the stream
  (`windows.continue_streamed`) and closed where `paper` would stop asking for chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from nudging_core.calls import CountedStream
from nudging_core.types import Completion, Piece, Token

from .algorithm import Takeover, run_rounds
from .context import NudgingContext
from .rules import Lookahead
from .windows import continue_streamed

# Longest single base stream; a confident base that goes on gets another one.
CONTINUATION_TOKENS = 256


def stream_tokens(context: NudgingContext, held: int, window_rest: int) -> int:
    """How many tokens a base stream asks for: what the budget leaves beyond the tokens
    held back, and at least the rest of the current window, which the chunk rules judge
    whole even where the budget ends inside it."""
    return max(window_rest, min(CONTINUATION_TOKENS, context.budget.remaining - held))


class ProbeStream:
    """A streamed base request whose first token is a probe and whose rest may continue."""

    def __init__(
        self, context: NudgingContext, prompt: str, max_tokens: int, order: asyncio.Lock | None = None
    ) -> None:
        self._slot_taken = asyncio.Event()
        self._request: AbstractAsyncContextManager[CountedStream] = context.base.stream(
            prompt, max_tokens, round_index=context.stats.rounds, slot_taken=self._slot_taken
        )
        self._order = order
        self._chunk_tokens = context.params.chunk_tokens
        self._stream: CountedStream | None = None
        self._tokens: AsyncIterator[Token] | None = None
        self._read: list[Token] = []
        self._first = asyncio.create_task(self._open())
        self._closed = False

    async def _enter(self) -> CountedStream:
        """Open the request; with `order`, take upstream slots in the order probes launched.

        A probe holds its slot until the round is decided, and the decision waits for the
        probes in boundary order; taking slots in that order keeps generations that share
        a bounded upstream from holding later probes while waiting for earlier ones.
        """
        entering = asyncio.ensure_future(self._request.__aenter__())
        try:
            if self._order is not None:
                async with self._order:
                    waiting = asyncio.ensure_future(self._slot_taken.wait())
                    try:
                        await asyncio.wait({entering, waiting}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiting.cancel()
            return await asyncio.shield(entering)
        except asyncio.CancelledError:
            # The request may have opened just before the cancellation landed: close it.
            entering.cancel()
            with contextlib.suppress(BaseException):
                await entering
                await self._request.__aexit__(None, None, None)
            raise

    async def _open(self) -> Completion:
        """The tokens up to the first with text (at most a chunk's worth): the first decides
        the takeover, and the probe is empty exactly where the paper's chunk probe is."""
        self._stream = stream = await self._enter()
        self._tokens = tokens = aiter(stream)
        while len(self._read) < self._chunk_tokens:
            token = await anext(tokens, None)
            if token is None:
                return Completion(tuple(self._read), stream.finish_reason)
            self._read.append(token)
            if token.text:
                break
        return Completion(tuple(self._read), None)

    def __await__(self) -> Generator[Any, None, Completion]:
        return self._first.__await__()

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason if self._stream is not None else None

    async def tokens(self, *, skip: int = 0) -> AsyncGenerator[Token, None]:
        """Every token of the stream after the first `skip`, as they come."""
        await self._first
        assert self._tokens is not None
        for token in self._read[skip:]:
            yield token
        async for token in self._tokens:
            yield token

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._first.cancel()
        # Also retrieves the failure of a probe nobody awaited (the round ended before it).
        await asyncio.gather(self._first, return_exceptions=True)
        if self._stream is not None:
            await self._request.__aexit__(None, None, None)


class _Probes:
    """The base probes of one round, keyed by word boundary.

    At most `probe_window` boundaries from the first undecided one are probed at once: every
    open probe is a base stream generating tokens, and with many generations sharing an
    upstream, probing every boundary of a long lookahead fills its slots with streams that
    are mostly thrown away. A probe that loses makes room for the next boundary.
    """

    def __init__(self, context: NudgingContext) -> None:
        self._context = context
        self._probes: dict[int, ProbeStream] = {}
        self._order = asyncio.Lock()
        self._undecided = 1  # the boundaries before it lost
        self._lookahead: Lookahead | None = None

    def launch(self, lookahead: Lookahead, boundary: int) -> ProbeStream:
        if boundary not in self._probes:
            context = self._context
            prompt = context.base_prompt + context.output + lookahead.prefix(boundary)
            max_tokens = stream_tokens(context, held=0, window_rest=context.params.chunk_tokens)
            self._probes[boundary] = ProbeStream(context, prompt, max_tokens, self._order)
        return self._probes[boundary]

    def launch_started_words(self, partial_text: str) -> None:
        """Probe the boundaries in the window whose following word has begun: their prompts
        are final."""
        self._lookahead = Lookahead.split(partial_text)
        self._fill_window()

    def _fill_window(self) -> None:
        lookahead = self._lookahead
        if lookahead is None:
            return
        end = min(len(lookahead.words), self._undecided + self._context.params.probe_window)
        for boundary in range(self._undecided, end):
            if lookahead.words[boundary]:
                self.launch(lookahead, boundary)

    async def first_tokens(self, lookahead: Lookahead, boundary: int) -> Completion:
        """The probe at `boundary`; the rule reads them in order, so the earlier ones lost
        and are closed now, freeing their upstream slots for the probes still waiting."""
        for earlier in [b for b in self._probes if b < boundary]:
            await self._probes.pop(earlier).close()
        self._undecided, self._lookahead = boundary, lookahead
        self._fill_window()
        return await self.launch(lookahead, boundary)

    def take(self, boundary: int) -> ProbeStream:
        """Keep the winning probe open: it is no longer closed with the others."""
        return self._probes.pop(boundary)

    async def close(self) -> None:
        probes, self._probes = list(self._probes.values()), {}
        await asyncio.gather(*(probe.close() for probe in probes), return_exceptions=True)


class BaseStream:
    """The base's continuation after the winning probe's first token, across as many
    streams as it takes: one that ends at its length is followed by a new one from the
    output plus the tokens held back."""

    def __init__(self, context: NudgingContext, winner: ProbeStream) -> None:
        self._context = context
        self._stream = winner
        self._tokens: AsyncIterator[Token] = winner.tokens(skip=1)
        self._empty = False  # the current stream has given no token yet
        self.stopped = False

    async def next(self, held: list[Token], window_rest: int) -> Token | None:
        """The next token, or None when the base has stopped (or a new stream has nothing)."""
        while not self.stopped:
            token = await anext(self._tokens, None)
            if token is not None:
                self._empty = False
                return token
            if self._stream.finish_reason == "stop" or self._empty:
                self.stopped = True
                break
            self._empty = True
            await self._stream.close()
            context = self._context
            prompt = context.base_prompt + context.output + "".join(token.text for token in held)
            self._stream = ProbeStream(context, prompt, stream_tokens(context, len(held), window_rest))
            self._tokens = self._stream.tokens()
        return None

    async def close(self) -> None:
        await self._stream.close()


class FastRound:
    """One round's I/O: the lookahead and the probes streamed, the winner continuing."""

    def __init__(self, context: NudgingContext) -> None:
        self._context = context
        self._probes = _Probes(context)
        self._winner: ProbeStream | None = None

    async def lookahead(self) -> Completion:
        context = self._context
        tokens: list[Token] = []
        text = ""
        async with context.nudger.stream(
            context.nudging_prompt + context.output,
            context.params.lookahead_tokens,
            round_index=context.stats.rounds,
        ) as stream:
            async for token in stream:
                tokens.append(token)
                text += token.text
                self._probes.launch_started_words(text)
            finish_reason = stream.finish_reason
        return Completion(tuple(tokens), finish_reason)

    async def probe(self, lookahead: Lookahead, boundary: int) -> Completion:
        return await self._probes.first_tokens(lookahead, boundary)

    async def settle(self, takeover: Takeover) -> None:
        if takeover.boundary is not None:
            self._winner = self._probes.take(takeover.boundary)
        await self._probes.close()

    async def continuation(self, probe: Completion) -> AsyncGenerator[Piece, None]:
        assert self._winner is not None
        base = BaseStream(self._context, self._winner)
        try:
            async for piece in continue_streamed(self._context, probe.tokens[0], base.next):
                yield piece
        finally:
            await base.close()

    async def aclose(self) -> None:
        await self._probes.close()
        if self._winner is not None:
            await self._winner.close()


@asynccontextmanager
async def _fast_round(context: NudgingContext) -> AsyncIterator[FastRound]:
    io = FastRound(context)
    try:
        yield io
    finally:
        await io.aclose()


def generate_fast(context: NudgingContext) -> AsyncGenerator[Piece, None]:
    return run_rounds(context, _fast_round)
