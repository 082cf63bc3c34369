"""What a nudging strategy works with: prompts, the two upstream roles, budget, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nudging_core.calls import RoleCaller
from nudging_core.stopping import Budget
from nudging_core.types import GenerationStats, Piece, Token, piece_from_tokens

from .rules import RepetitionGuard

Strategy = Literal["paper", "fast"]


@dataclass(frozen=True, slots=True)
class NudgingParams:
    threshold: float = 0.4
    lookahead_tokens: int = 16
    chunk_tokens: int = 16
    max_rounds: int = 150
    strategy: Strategy = "fast"
    cleanup: bool = False
    probe_window: int = 2  # fast: base probes of one round open at once


@dataclass(slots=True)
class NudgingContext:
    """The state of one nudged generation: the text accepted so far, charged to the budget."""

    base: RoleCaller
    nudger: RoleCaller
    base_prompt: str
    nudging_prompt: str
    params: NudgingParams
    budget: Budget
    stats: GenerationStats
    output: str = ""
    repetition: RepetitionGuard = field(default_factory=RepetitionGuard)
    # The base's top-1 probability at the output's end, when the base was asked there (the
    # uncertain token that ended its continuation, or the last boundary probed): it is why
    # the nudger writes the next token, which the logprobs' report shows.
    base_top_prob_at_end: float | None = None

    def accept(self, piece: Piece) -> Piece:
        """Charge a piece to the budget and append what fits to the output."""
        taken = self.budget.take(piece)
        self.output += taken.text
        if taken.text:
            self.base_top_prob_at_end = None
        return taken

    def base_uncertain(self, token: Token) -> None:
        """The base's continuation ends at this uncertain token, at the output's end."""
        self.stats.fire("uncertain_token")
        self.base_top_prob_at_end = token.top_prob

    def accept_tokens(self, tokens: list[Token] | tuple[Token, ...]) -> Piece:
        return self.accept(piece_from_tokens(tokens, "base"))

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
