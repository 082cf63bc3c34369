"""What a nudging strategy works with: prompts, the two upstream roles, budget, stats."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from nudging_core.calls import RoleCaller
from nudging_core.stopping import Budget
from nudging_core.types import Completion, GenerationStats, Piece, Token, piece_from_prefix, piece_from_tokens

from .rules import Lookahead, RepetitionGuard, takes_over

Strategy = Literal["paper", "fast"]


@dataclass(frozen=True, slots=True)
class NudgingParams:
    threshold: float = 0.4
    lookahead_tokens: int = 16
    chunk_tokens: int = 16
    max_rounds: int = 150
    strategy: Strategy = "fast"
    cleanup: bool = False
    probe_window: int = 4  # fast: base probes of one round open at once


@dataclass(slots=True)
class NudgingContext:
    base: RoleCaller
    nudger: RoleCaller
    base_prompt: str
    nudging_prompt: str
    params: NudgingParams
    budget: Budget
    stats: GenerationStats
    output: str = ""
    repetition: RepetitionGuard = field(default_factory=RepetitionGuard)

    def accept(self, piece: Piece) -> Piece:
        """Charge a piece to the budget and append what fits to the output."""
        taken = self.budget.take(piece)
        self.output += taken.text
        return taken

    def accept_tokens(self, tokens: list[Token] | tuple[Token, ...]) -> Piece:
        return self.accept(piece_from_tokens(tokens, "base"))

    def nudging_piece(self, lookahead: Completion, text: str) -> Piece:
        return piece_from_prefix(lookahead.tokens, len(text), "nudging")

    def start_round(self) -> bool:
        """Open a round if the budget and the round limit allow it."""
        if self.budget.exhausted:
            self.stats.stop_reason = "length"
            return False
        if self.stats.rounds >= self.params.max_rounds:
            self.stats.stop_reason = "round_limit"
            self.stats.fire("round_limit")
            return False
        self.stats.rounds += 1
        return True

    def nudger_finished(self, lookahead: Completion) -> Piece | None:
        """Step 2: a nudger that stopped supplies its whole lookahead and ends the generation."""
        if lookahead.finish_reason != "stop":
            return None
        self.stats.fire("nudger_stop")
        whole = piece_from_tokens(lookahead.tokens, "nudging")
        taken = self.accept(whole)
        self.stats.stop_reason = "nudging_model_stop" if taken == whole else "length"
        return taken

    def repeated(self, nudging_words: str) -> bool:
        """Step 5: the fourth identical set of nudging words in a row ends the generation."""
        if self.repetition.repeated(nudging_words):
            self.stats.fire("repeated_nudging_words")
            self.stats.stop_reason = "repeated_nudging_words"
            return True
        return False


def split_lookahead(context: NudgingContext, text: str) -> Lookahead:
    lookahead = Lookahead.split(text)
    if lookahead.space_prefix:
        context.stats.fire("space_prefix")
    if len(lookahead.words) == 1:
        context.stats.fire("one_word")
    if any("\n" in word for word in lookahead.words):
        context.stats.fire("newline_in_word")
    return lookahead


Prober = Callable[[Lookahead, int], Awaitable[Completion]]


@dataclass(frozen=True, slots=True)
class Takeover:
    """Where the base takes over: the boundary and its probe (both None when it does not)."""

    nudging_words: str
    boundary: int | None = None
    probe: Completion | None = None


async def find_takeover(context: NudgingContext, lookahead_text: str, probe_at: Prober) -> Takeover:
    """Step 4: the nudging words, and the probe of the boundary where the base takes over."""
    lookahead = split_lookahead(context, lookahead_text)
    if len(lookahead.words) == 1:
        return Takeover(lookahead.prefix(1))
    for boundary in range(1, lookahead.last_boundary + 1):
        word = lookahead.words[boundary]
        if word == "":
            context.stats.fire("empty_word_skipped")
            continue
        probe = await probe_at(lookahead, boundary)
        first = probe.tokens[0] if probe.tokens else None
        if takes_over(first, word, context.params.threshold):
            context.stats.fire("takeover" if boundary == 1 else "takeover_after_first_word")
            return Takeover(lookahead.prefix(boundary), boundary, probe)
    context.stats.fire("no_takeover")
    return Takeover(lookahead.prefix(lookahead.last_boundary))
