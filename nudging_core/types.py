"""Value types shared by the upstream client, the algorithms and the server."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

# Which model wrote a piece of output (provenance).
Source = Literal["base", "nudging"]
# Which upstream a call goes to: the sources, plus the aligned model's own base model,
# which only proxy tuning asks (it never writes output itself).
Role = Literal["base", "nudging", "nudging_base"]


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token as an upstream reports it.

    `text` is the properly decoded text this token adds (it may be "" while a multi-byte
    character is incomplete; the next token then carries the whole character).
    `top_logprob` is the highest logprob of the distribution at this position, so
    exp(top_logprob) is the top-1 probability nudging compares with its threshold.
    """

    text: str
    logprob: float
    top_logprob: float
    top_logprobs: dict[str, float] | None = None

    @property
    def top_prob(self) -> float:
        return math.exp(self.top_logprob)


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished (non-streamed) completion from one upstream call."""

    tokens: tuple[Token, ...]
    finish_reason: str | None
    prompt_tokens: int | None = None

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)

    @property
    def written_tokens(self) -> tuple[Token, ...]:
        """The tokens without the start of a character the completion did not finish.

        A character split over several tokens (an emoji, say) comes as tokens with no text
        and its whole text on the token that completes it (vLLM sends ""). A completion cut
        by its token limit after such tokens wrote nothing with them: the next request, which
        continues from the text, writes them again.
        """
        if self.finish_reason == "stop":
            return self.tokens
        end = len(self.tokens)
        while end > 0 and self.tokens[end - 1].text == "":
            end -= 1
        return self.tokens[:end]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class WrittenToken:
    """An upstream token as it went into the output, for the logprobs a nudged model returns.

    `token` is as the model that wrote it reported it; `base_top_prob` is the base's top-1
    probability at this position when the base was asked there (a base token's own; for a
    nudger token, the probe or the uncertain base token that let the nudger write it).
    """

    token: Token
    base_top_prob: float | None = None


@dataclass(frozen=True, slots=True)
class Piece:
    """A span of output text decided by one model.

    `token_ends` holds the end offset (in characters of `text`) of every token that
    covers the piece, so a budget can cut the piece exactly at a token boundary.
    A token cut by a word boundary ends at len(text) and counts once.
    """

    text: str
    source: Source
    token_ends: tuple[int, ...]
    # The upstream's logprobs for the piece, in the completions shape: a passthrough's as the
    # upstream sent them, a nudged model's built from `written` (`Generation` does that).
    logprobs: dict[str, Any] | None = None
    # A nudged model's piece: the tokens that wrote it, one per `token_ends` (or none). Not
    # compared: pieces are equal by what they write.
    written: tuple[WrittenToken, ...] = field(default=(), compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ends)

    def truncated(self, max_tokens: int) -> Piece:
        if max_tokens >= self.num_tokens:
            return self
        if max_tokens <= 0:
            return Piece("", self.source, ())
        ends = self.token_ends[:max_tokens]
        return Piece(self.text[: ends[-1]], self.source, ends, _first_logprobs(self.logprobs, max_tokens),
                     self.written[:max_tokens])

    def with_base_top_probs(self, at_offsets: dict[int, float]) -> Piece:
        """The piece with the base's top-1 probability on its tokens that start at these
        character offsets (where the base was asked and the nudger wrote)."""
        if not at_offsets or not self.written:
            return self
        starts = (0, *self.token_ends[:-1])
        written = tuple(
            WrittenToken(item.token, at_offsets.get(start, item.base_top_prob))
            for start, item in zip(starts, self.written, strict=True)
        )
        return Piece(self.text, self.source, self.token_ends, self.logprobs, written)


def _first_logprobs(logprobs: dict[str, Any] | None, count: int) -> dict[str, Any] | None:
    """The completions-shape logprobs of the first `count` tokens (a piece cut at a token)."""
    if logprobs is None:
        return None
    return {key: values[:count] if isinstance(values, list) else values for key, values in logprobs.items()}


def written_logprobs(piece: Piece, offset: int, top_k: int) -> dict[str, Any]:
    """The completions-shape logprobs of the tokens that wrote `piece`, whose text starts at
    `offset` in the answer: each token's text as it is in the piece (a token cut by a word
    boundary or a stop string keeps its logprob), and its model's top alternatives as that
    model sent them (with `top_k` 0, the base was asked for 1: only the token itself)."""
    starts = (0, *piece.token_ends[:-1])
    texts = [piece.text[start:end] for start, end in zip(starts, piece.token_ends, strict=True)]
    tokens = [item.token for item in piece.written]
    return {
        "tokens": texts,
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [
            {text: token.logprob} if top_k == 0 or token.top_logprobs is None else dict(token.top_logprobs)
            for text, token in zip(texts, tokens, strict=True)
        ],
        "text_offset": [offset + start for start in starts],
    }


def _written(tokens: tuple[Token, ...] | list[Token], source: Source) -> tuple[WrittenToken, ...]:
    # A base token's own top-1 probability is the base's at its position.
    return tuple(WrittenToken(token, token.top_prob if source == "base" else None) for token in tokens)


def piece_from_tokens(tokens: tuple[Token, ...] | list[Token], source: Source) -> Piece:
    ends: list[int] = []
    offset = 0
    for token in tokens:
        offset += len(token.text)
        ends.append(offset)
    return Piece("".join(t.text for t in tokens), source, tuple(ends), written=_written(tokens, source))


def piece_from_prefix(tokens: tuple[Token, ...] | list[Token], length: int, source: Source) -> Piece:
    """The first `length` characters of the tokens' text, with the tokens covering them."""
    ends: list[int] = []
    offset = 0
    text = "".join(t.text for t in tokens)[:length]
    for token in tokens:
        if offset >= length:
            break
        offset += len(token.text)
        ends.append(min(offset, length))
    if length > 0 and not ends:
        raise ValueError("prefix longer than the tokens' text")
    return Piece(text, source, tuple(ends), written=_written(tokens[: len(ends)], source))


FinishReason = Literal["stop", "length"]

# The decisions of nudging (docs/algorithm.md) a generation counts, by the step that makes them.
NudgingRule = Literal[
    # steps 2-4: the lookahead and the takeover
    "nudger_stop", "space_prefix", "one_word", "newline_in_word", "empty_word_skipped",
    "takeover", "takeover_after_first_word", "no_takeover",
    # steps 5-6: repetition, an empty probe
    "repeated_nudging_words", "empty_probe",
    # step 7: the base continuation and its chunk guards
    "chunk_empty", "chunk_repeats", "chunk_copies_output", "uncertain_token", "base_stop",
    "budget_in_continuation",
    # the round limit, step 8
    "round_limit", "cleanup",
]
# The baselines' decisions, and why a baseline generation ended.
BaselineRule = Literal["end_pick_dropped", "forced_token"]
BaselineEnd = Literal["nudging_model_stop", "empty_round"]
Rule = NudgingRule | BaselineRule | BaselineEnd
# Why a generation ended, as the `nudging` extension reports it.
StopReason = Literal[
    "length", "context_length", "stop_string", "round_limit", "nudging_model_stop",
    "repeated_nudging_words", "empty_round", "base_stop", "nudging_stop",
]


@dataclass(slots=True)
class GenerationStats:
    """What one generation did; reported in the `nudging` response extension."""

    rounds: int = 0
    stop_reason: StopReason | None = None
    upstream_requests: dict[str, int] = field(default_factory=lambda: {"base": 0, "nudging": 0})
    cancelled_requests: dict[str, int] = field(default_factory=lambda: {"base": 0, "nudging": 0})
    upstream_tokens: dict[str, int] = field(default_factory=lambda: {"base": 0, "nudging": 0})
    rules: dict[Rule, int] = field(default_factory=dict)
    # The prompt size each role's upstream first reported.
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    # `fast` holds back base tokens while a chunk guard may still drop them: how many, and
    # for how many later tokens each waited (summed).
    held_tokens: int = 0
    held_token_delay: int = 0

    def fire(self, rule: Rule) -> None:
        self.rules[rule] = self.rules.get(rule, 0) + 1

    def track(self, role: Role) -> None:
        """Count the calls of a role beyond the two every generation reports."""
        for counts in (self.upstream_requests, self.cancelled_requests, self.upstream_tokens):
            counts.setdefault(role, 0)
