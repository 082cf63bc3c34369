"""The nudging algorithm: strategies `paper` and `fast` and the optional clean-up."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from nudging_core.types import Piece

from .algorithm import cleaned_pieces
from .context import NudgingContext, NudgingParams, Strategy
from .fast import generate_fast
from .paper import generate_paper
from .rules import cleaned_bounds

__all__ = ["NudgingContext", "NudgingParams", "Strategy", "nudge", "cleaned_bounds", "cleaned_pieces"]


async def nudge(context: NudgingContext) -> AsyncGenerator[Piece, None]:
    """Pieces of nudged text as they are decided (all at the end when clean-up is on)."""
    generate = generate_paper if context.params.strategy == "paper" else generate_fast
    async with aclosing(generate(context)) as pieces:
        if not context.params.cleanup:
            async for piece in pieces:
                yield piece
            return
        collected = [piece async for piece in pieces]
    cleaned = cleaned_pieces(collected)
    if "".join(p.text for p in cleaned) != "".join(p.text for p in collected):
        context.stats.fire("cleanup")
    for piece in cleaned:
        yield piece
