"""The nudging algorithm: strategies `paper` and `fast` and the optional clean-up."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from nudging_core.stopping import split_piece
from nudging_core.types import Piece

from .context import NudgingContext, NudgingParams, Strategy
from .fast import generate_fast
from .paper import generate_paper
from .rules import cleaned_bounds

__all__ = ["NudgingContext", "NudgingParams", "Strategy", "nudge", "cleaned_bounds", "cleaned_pieces"]


def cleaned_pieces(pieces: list[Piece]) -> list[Piece]:
    """Step 8 on a finished generation: keep the span of text the clean-up keeps."""
    text = "".join(piece.text for piece in pieces)
    start, end = cleaned_bounds(text)
    kept: list[Piece] = []
    offset = 0
    for piece in pieces:
        piece_start, offset = offset, offset + len(piece.text)
        if piece_start >= start and offset <= end:
            kept.append(piece)
            continue
        head_cut = max(0, start - piece_start)
        tail_cut = max(0, min(len(piece.text), end - piece_start))
        if tail_cut <= head_cut:
            continue
        middle = split_piece(piece, tail_cut)[0]
        if head_cut:
            middle = split_piece(middle, head_cut, straddler_in_tail=True)[1]
        kept.append(middle)
    return kept


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
