"""Strategy `fast`: the decisions of `paper`, with far fewer waits (DESIGN 3.2).

- The nudger's lookahead is streamed, and the base is probed at a word boundary as soon
  as the next word has begun, all probes of a round concurrently, each for one token.
- The first boundary (in order) whose probe satisfies the rule wins; the others are
  cancelled, including those still queued for an upstream slot.
- The base's continuation is one streamed request, closed at the first uncertain token,
  instead of 16-token chunks whose tails are thrown away.

The step-7 repetition guards look at whole 16-token chunks, which this strategy never
fetches, so they do not apply here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from nudging_core.types import Completion, Piece, Token

from .context import NudgingContext, find_takeover
from .rules import Lookahead

# Longest single continuation request; a confident base that goes on gets another one.
CONTINUATION_TOKENS = 256


class _Probes:
    """The base probes of one round, keyed by word boundary."""

    def __init__(self, context: NudgingContext) -> None:
        self._context = context
        self._tasks: dict[int, asyncio.Task[Completion]] = {}

    def launch(self, lookahead: Lookahead, boundary: int) -> asyncio.Task[Completion]:
        if boundary not in self._tasks:
            context = self._context
            prompt = context.base_prompt + context.output + lookahead.prefix(boundary)
            self._tasks[boundary] = asyncio.create_task(
                context.base.complete(prompt, 1, round_index=context.stats.rounds)
            )
        return self._tasks[boundary]

    def launch_started_words(self, partial_text: str) -> None:
        """Probe every boundary whose following word has begun: its prompt is final."""
        lookahead = Lookahead.split(partial_text)
        for boundary in range(1, len(lookahead.words)):
            if lookahead.words[boundary]:
                self.launch(lookahead, boundary)

    async def cancel(self) -> None:
        pending = [task for task in self._tasks.values() if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


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


async def _continue_base(context: NudgingContext, first: Token) -> AsyncIterator[Piece]:
    stats = context.stats
    yield context.accept_tokens([first])
    while not context.budget.exhausted:
        max_tokens = min(context.budget.remaining, CONTINUATION_TOKENS)
        async with context.base.stream(
            context.base_prompt + context.output, max_tokens, round_index=stats.rounds
        ) as stream:
            async for token in stream:
                if token.top_prob < context.params.threshold:
                    stats.fire("uncertain_token")
                    return
                yield context.accept_tokens([token])
                if context.budget.exhausted:
                    break
            finish_reason = stream.finish_reason
        if finish_reason == "stop":
            stats.fire("base_stop")
            return
    stats.fire("budget_in_continuation")


async def generate_fast(context: NudgingContext) -> AsyncIterator[Piece]:
    while context.start_round():
        probes = _Probes(context)
        try:
            lookahead = await _stream_lookahead(context, probes)
            final = context.nudger_finished(lookahead)
            if final is not None:
                yield final
                return
            nudging_words, probe = await find_takeover(context, lookahead.text, probes.launch)
        finally:
            await probes.cancel()
        if context.repeated(nudging_words):
            return
        yield context.accept(context.nudging_piece(lookahead, nudging_words))
        if probe is None or context.budget.exhausted:
            continue
        # A one-token probe has empty text also when its token is half a character; only
        # a probe the base ended at once is empty in `paper`'s sense.
        if probe.text == "" and probe.finish_reason == "stop":
            context.stats.fire("empty_probe")
            continue
        async for piece in _continue_base(context, probe.tokens[0]):
            yield piece
