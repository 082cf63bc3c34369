"""Strategy `fast`: the decisions of `paper`, with far fewer waits (DESIGN 3.2).

- The nudger's lookahead is streamed, and the base is probed at a word boundary as soon
  as the next word has begun, all probes of a round concurrently.
- Each probe is a streamed request that can *be* the continuation: the first token decides
  the takeover; the winning probe's stream goes on as the base's continuation, so the base
  is already writing while the lookahead finishes; losing probes are closed at once.
- The continuation is closed at the first uncertain token (vLLM aborts a request whose
  client disconnects) instead of fetching 16-token chunks and throwing the tails away.

The step-7 repetition guards look at whole 16-token chunks, which this strategy never
fetches, so they do not apply here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any

from nudging_core.calls import CountedStream
from nudging_core.types import Completion, Piece, Token

from .context import NudgingContext, find_takeover
from .rules import Lookahead

# Longest single continuation request; a confident base that goes on gets another one.
CONTINUATION_TOKENS = 256


class ProbeStream:
    """A streamed base request whose first token is a probe and whose rest may continue."""

    def __init__(self, context: NudgingContext, prompt: str, order: asyncio.Lock | None = None) -> None:
        max_tokens = max(1, min(context.budget.remaining, CONTINUATION_TOKENS))
        self._slot_taken = asyncio.Event()
        self._request: AbstractAsyncContextManager[CountedStream] = context.base.stream(
            prompt, max_tokens, round_index=context.stats.rounds, slot_taken=self._slot_taken
        )
        self._order = order
        self._stream: CountedStream | None = None
        self._tokens: AsyncIterator[Token] | None = None
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
        self._stream = stream = await self._enter()
        self._tokens = tokens = aiter(stream)
        first = await anext(tokens, None)
        if first is None:
            return Completion((), stream.finish_reason)
        if first.text == "":
            # An end-of-sequence token may come with empty text: look one token further to
            # know whether the base ended at once (an empty probe, as `paper` sees it).
            following = await anext(tokens, None)
            if following is None:
                return Completion((first,), stream.finish_reason)
            self._tokens = _prepend(following, tokens)
        return Completion((first,), None)

    def __await__(self) -> Generator[Any, None, Completion]:
        """Awaiting a probe gives its first token as a one-token completion."""
        return self._first.__await__()

    @property
    def finish_reason(self) -> str | None:
        return self._stream.finish_reason if self._stream is not None else None

    async def rest(self) -> AsyncGenerator[Token, None]:
        assert self._tokens is not None
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


async def _prepend(first: Token, rest: AsyncIterator[Token]) -> AsyncGenerator[Token, None]:
    yield first
    async for token in rest:
        yield token


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
            self._probes[boundary] = ProbeStream(context, prompt, self._order)
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

    async def first_token(self, lookahead: Lookahead, boundary: int) -> Completion:
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


async def _stream_lookahead(context: NudgingContext, probes: _Probes) -> Completion:
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
            probes.launch_started_words(text)
        finish_reason = stream.finish_reason
    return Completion(tuple(tokens), finish_reason)


async def _base_tokens(context: NudgingContext, probe: ProbeStream) -> AsyncGenerator[Token, None]:
    """The base's continuation after the probe's first token, across as many streams as needed."""
    try:
        while True:
            async for token in probe.rest():
                yield token
            finish_reason = probe.finish_reason
            await probe.close()
            if finish_reason == "stop":
                context.stats.fire("base_stop")
                return
            probe = ProbeStream(context, context.base_prompt + context.output)
            for token in (await probe).tokens:
                yield token
    finally:
        await probe.close()


async def _continue_base(
    context: NudgingContext, probe: ProbeStream, first: Token
) -> AsyncGenerator[Piece, None]:
    """Step 7 as streams, closed at the first uncertain token."""
    yield context.accept_tokens([first])
    if context.budget.exhausted:
        context.stats.fire("budget_in_continuation")
        return
    async with aclosing(_base_tokens(context, probe)) as tokens:
        async for token in tokens:
            if token.top_prob < context.params.threshold:
                context.stats.fire("uncertain_token")
                return
            yield context.accept_tokens([token])
            if context.budget.exhausted:
                context.stats.fire("budget_in_continuation")
                return


async def generate_fast(context: NudgingContext) -> AsyncGenerator[Piece, None]:
    while context.start_round():
        probes = _Probes(context)
        winner: ProbeStream | None = None
        try:
            lookahead = await _stream_lookahead(context, probes)
            final = context.nudger_finished(lookahead)
            if final is not None:
                yield final
                return
            takeover = await find_takeover(context, lookahead.text, probes.first_token)
            if takeover.boundary is not None:
                winner = probes.take(takeover.boundary)
        finally:
            await probes.close()
        try:
            if context.repeated(takeover.nudging_words):
                return
            yield context.accept(context.nudging_piece(lookahead, takeover.nudging_words))
            probe = takeover.probe
            if probe is None or winner is None or context.budget.exhausted:
                continue
            # A one-token probe has empty text also when its token is half a character; only
            # a probe the base ended at once is empty in `paper`'s sense.
            if probe.text == "" and probe.finish_reason == "stop":
                context.stats.fire("empty_probe")
                continue
            async for piece in _continue_base(context, winner, probe.tokens[0]):
                yield piece
        finally:
            if winner is not None:
                await winner.close()
