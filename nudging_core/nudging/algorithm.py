"""Nudging, round by round, with the steps numbered as in docs/algorithm.md.

A strategy supplies only a round's upstream I/O (`RoundIO`): reading the nudger's lookahead,
probing the base at a word boundary, and reading the base's continuation. What is done with
what they return is decided here and in `rules`, the same way for every strategy.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from nudging_core.stopping import split_piece
from nudging_core.types import Completion, Piece, piece_from_prefix, piece_from_tokens

from .context import NudgingContext
from .rules import ChunkVerdict, Lookahead, cleaned_bounds, judge_chunk, takes_over


@dataclass(frozen=True, slots=True)
class Takeover:
    """Where the base takes over: the boundary and its probe (both None when it does not)."""

    nudging_words: str
    boundary: int | None = None
    probe: Completion | None = None
    # The base's top-1 probability at each boundary it lost, by the boundary's character
    # offset in the lookahead: the nudger token starting there was written over it.
    lost_at: tuple[tuple[int, float], ...] = ()


Prober = Callable[[Lookahead, int], Awaitable[Completion]]


class RoundIO(Protocol):
    """The upstream I/O of one round, as a strategy does it."""

    async def lookahead(self) -> Completion:
        """Step 1: up to L nudger tokens continuing the nudging prompt and the output."""
        ...

    async def probe(self, lookahead: Lookahead, boundary: int) -> Completion:
        """Step 4: the base after the lookahead's first `boundary` words.

        Its first token decides the takeover; its text is empty only where the paper's
        C-token probe's would be.
        """
        ...

    async def settle(self, takeover: Takeover) -> None:
        """The takeover is decided: let go of the probes that lost."""
        ...

    def continuation(self, probe: Completion) -> AsyncIterator[Piece]:
        """Step 7: the base's continuation from the probe that took over."""
        ...


OpenRound = Callable[[NudgingContext], AbstractAsyncContextManager[RoundIO]]


async def run_rounds(context: NudgingContext, open_round: OpenRound) -> AsyncGenerator[Piece, None]:
    """Steps 1-7, round after round, until one of them or the budget ends the generation."""
    while context.start_round():
        async with open_round(context) as io:
            lookahead = await io.lookahead()
            final = nudger_finished(context, lookahead)
            if final is not None:
                yield final
                return
            takeover = await find_takeover(context, lookahead.text, io.probe)
            await io.settle(takeover)
            if repeated(context, takeover.nudging_words):
                return
            yield append_nudging_words(context, lookahead, takeover)
            if base_continues(context, takeover):
                assert takeover.probe is not None
                async for piece in io.continuation(takeover.probe):
                    yield piece


def nudger_finished(context: NudgingContext, lookahead: Completion) -> Piece | None:
    """Step 2: a nudger that stopped supplies its whole lookahead and ends the generation."""
    if lookahead.finish_reason != "stop":
        return None
    context.stats.fire("nudger_stop")
    whole = nudger_piece(context, piece_from_tokens(lookahead.tokens, "nudging"), ())
    taken = context.accept(whole)
    context.stats.stop_reason = "nudging_model_stop" if taken == whole else "length"
    return taken


def split_lookahead(context: NudgingContext, text: str) -> Lookahead:
    """Step 3: leading spaces, then words by `split(" ")`."""
    lookahead = Lookahead.split(text)
    if lookahead.space_prefix:
        context.stats.fire("space_prefix")
    if len(lookahead.words) == 1:
        context.stats.fire("one_word")
    if any("\n" in word for word in lookahead.words):
        context.stats.fire("newline_in_word")
    return lookahead


async def find_takeover(context: NudgingContext, lookahead_text: str, probe_at: Prober) -> Takeover:
    """Steps 3-4: the nudging words, and the probe of the boundary where the base takes over."""
    lookahead = split_lookahead(context, lookahead_text)
    if len(lookahead.words) == 1:
        return Takeover(lookahead.prefix(1))
    lost_at: list[tuple[int, float]] = []
    for boundary in range(1, lookahead.last_boundary + 1):
        word = lookahead.words[boundary]
        if word == "":
            context.stats.fire("empty_word_skipped")
            continue
        probe = await probe_at(lookahead, boundary)
        first = probe.tokens[0] if probe.tokens else None
        if takes_over(first, word, context.params.threshold):
            context.stats.fire("takeover" if boundary == 1 else "takeover_after_first_word")
            return Takeover(lookahead.prefix(boundary), boundary, probe, tuple(lost_at))
        assert first is not None  # a probe without a token takes over
        lost_at.append((len(lookahead.prefix(boundary)), first.top_prob))
    context.stats.fire("no_takeover")
    return Takeover(lookahead.prefix(lookahead.last_boundary), lost_at=tuple(lost_at))


def repeated(context: NudgingContext, nudging_words: str) -> bool:
    """Step 5: the fourth identical set of nudging words in a row ends the generation."""
    if context.repetition.repeated(nudging_words):
        context.stats.fire("repeated_nudging_words")
        context.stats.stop_reason = "repeated_nudging_words"
        return True
    return False


def append_nudging_words(context: NudgingContext, lookahead: Completion, takeover: Takeover) -> Piece:
    """Step 6: the nudging words join the output, with the nudger tokens that cover them."""
    words = piece_from_prefix(lookahead.tokens, len(takeover.nudging_words), "nudging")
    piece = context.accept(nudger_piece(context, words, takeover.lost_at))
    # Without a takeover, the next round starts where the last boundary was probed.
    ends_at = len(takeover.nudging_words)
    lost_at_end = [prob for offset, prob in takeover.lost_at if offset == ends_at]
    if takeover.boundary is None and lost_at_end and piece.text == takeover.nudging_words:
        context.base_top_prob_at_end = lost_at_end[0]
    return piece


def nudger_piece(context: NudgingContext, piece: Piece, lost_at: tuple[tuple[int, float], ...]) -> Piece:
    """A piece of nudger tokens, with the base's top-1 probability where the base was asked."""
    known = dict(lost_at)
    if context.base_top_prob_at_end is not None:
        known[0] = context.base_top_prob_at_end
    return piece.with_base_top_probs(known)


def base_continues(context: NudgingContext, takeover: Takeover) -> bool:
    """Step 6: the base continues only where it took over with a probe that has text."""
    if takeover.probe is None or context.budget.exhausted:
        return False
    if takeover.probe.text == "":
        context.stats.fire("empty_probe")
        return False
    return True


def apply_verdict(context: NudgingContext, verdict: ChunkVerdict) -> Piece | None:
    """Step 7 (c)-(d) for a judged chunk: the piece it adds, None when it is dropped; the
    rule that ends the continuation here is counted."""
    if verdict.dropped:
        assert verdict.ends is not None
        context.stats.fire(verdict.ends)
        return None
    piece = context.accept_tokens(verdict.accepted)
    if verdict.uncertain is not None:
        context.base_uncertain(verdict.uncertain)
    elif verdict.ends is not None:
        context.stats.fire(verdict.ends)
    return piece


ChunkFetcher = Callable[[], Awaitable[Completion]]


async def continue_in_chunks(
    context: NudgingContext, probe: Completion, fetch_chunk: ChunkFetcher
) -> AsyncGenerator[Piece, None]:
    """Step 7 on whole chunks: the probe's first token, then its other tokens as the first
    chunk, then C-token chunks, until the base is uncertain, loops, stops or the budget ends."""
    stats = context.stats
    first = context.accept_tokens(probe.tokens[:1])
    yield first
    base_text = first.text
    # (A chunk cut inside a split character leaves its first tokens to the next chunk.)
    chunk = probe.written_tokens[1:]
    finish_reason: str | None = None  # the probe's own finish is not looked at
    while not context.budget.exhausted:
        verdict = judge_chunk(chunk, base_text, context.output, context.params.threshold)
        piece = apply_verdict(context, verdict)
        if piece is None:
            return
        base_text += piece.text
        yield piece
        if verdict.ends is not None:
            return
        if finish_reason == "stop":
            stats.fire("base_stop")
            return
        if context.budget.exhausted:
            break
        completion = await fetch_chunk()
        chunk, finish_reason = completion.written_tokens, completion.finish_reason
    stats.fire("budget_in_continuation")


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
