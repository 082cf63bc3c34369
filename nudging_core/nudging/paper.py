"""Strategy `paper`: the algorithm exactly as the paper's code runs it (docs/algorithm.md).

Sequential, whole-chunk requests; the correctness oracle for every faster strategy.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

from nudging_core.types import Completion, Piece

from .algorithm import Takeover, continue_in_chunks, run_rounds
from .context import NudgingContext
from .rules import Lookahead


class PaperRound:
    """One round's I/O: each a whole, non-streamed request, one after the other."""

    def __init__(self, context: NudgingContext) -> None:
        self._context = context

    async def lookahead(self) -> Completion:
        context = self._context
        return await context.nudger.complete(
            context.nudging_prompt + context.output,
            context.params.lookahead_tokens,
            round_index=context.stats.rounds,
        )

    async def probe(self, lookahead: Lookahead, boundary: int) -> Completion:
        context = self._context
        return await context.base.complete(
            context.base_prompt + context.output + lookahead.prefix(boundary),
            context.params.chunk_tokens,
            round_index=context.stats.rounds,
        )

    async def settle(self, takeover: Takeover) -> None:
        """Nothing is left open between requests."""

    def continuation(self, probe: Completion) -> AsyncIterator[Piece]:
        return continue_in_chunks(self._context, probe, self._next_chunk)

    async def _next_chunk(self) -> Completion:
        context = self._context
        return await context.base.complete(
            context.base_prompt + context.output,
            context.params.chunk_tokens,
            round_index=context.stats.rounds,
        )


@asynccontextmanager
async def _paper_round(context: NudgingContext) -> AsyncIterator[PaperRound]:
    yield PaperRound(context)


def generate_paper(context: NudgingContext) -> AsyncGenerator[Piece, None]:
    return run_rounds(context, _paper_round)
