"""Strategy `paper`: the algorithm exactly as the paper's code runs it (DESIGN 3.1).

Sequential, whole-chunk requests; the correctness oracle for every faster strategy.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from nudging_core.types import Completion, Piece, Token

from .context import NudgingContext, find_takeover
from .rules import Lookahead, certain_prefix, copies_output


async def _continue_base(context: NudgingContext, probe: Completion) -> AsyncGenerator[Piece, None]:
    """Step 7: the base continues in chunks until it is uncertain, loops, stops or runs out."""
    params = context.params
    stats = context.stats
    first_piece = context.accept_tokens(probe.tokens[:1])
    yield first_piece
    accepted = first_piece.text
    chunk: list[Token] = list(probe.tokens[1:])
    fetched_here = False
    finish_reason: str | None = None
    while not context.budget.exhausted:
        chunk_text = "".join(token.text for token in chunk)
        if chunk_text in accepted:
            stats.fire("chunk_repeats" if chunk_text else "chunk_empty")
            return
        certain, found_uncertain = certain_prefix(chunk, params.threshold)
        certain_text = "".join(token.text for token in certain)
        if copies_output(certain_text, context.output):
            stats.fire("chunk_copies_output")
            return
        piece = context.accept_tokens(certain)
        accepted += piece.text
        yield piece
        if found_uncertain:
            stats.fire("uncertain_token")
            return
        if fetched_here and finish_reason == "stop":
            stats.fire("base_stop")
            return
        if context.budget.exhausted:
            break
        completion = await context.base.complete(
            context.base_prompt + context.output, params.chunk_tokens, round_index=stats.rounds
        )
        chunk, finish_reason, fetched_here = list(completion.tokens), completion.finish_reason, True
    stats.fire("budget_in_continuation")


async def generate_paper(context: NudgingContext) -> AsyncGenerator[Piece, None]:
    params = context.params
    while context.start_round():
        lookahead = await context.nudger.complete(
            context.nudging_prompt + context.output,
            params.lookahead_tokens,
            round_index=context.stats.rounds,
        )
        final = context.nudger_finished(lookahead)
        if final is not None:
            yield final
            return

        async def probe_at(lookahead: Lookahead, boundary: int) -> Completion:
            return await context.base.complete(
                context.base_prompt + context.output + lookahead.prefix(boundary),
                params.chunk_tokens,
                round_index=context.stats.rounds,
            )

        takeover = await find_takeover(context, lookahead.text, probe_at)
        if context.repeated(takeover.nudging_words):
            return
        yield context.accept(context.nudging_piece(lookahead, takeover.nudging_words))
        probe = takeover.probe
        if probe is None or context.budget.exhausted:
            continue
        if probe.text == "":
            context.stats.fire("empty_probe")
            continue
        async for piece in _continue_base(context, probe):
            yield piece
