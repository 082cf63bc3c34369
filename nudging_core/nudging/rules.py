"""The decision rules of nudging (docs/algorithm.md), shared by every strategy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from nudging_core.types import Token

MIN_REPEATED_SUFFIX = 30
REPETITION_LIMIT = 3
COPY_MIN_PIECES = 5


@dataclass(frozen=True, slots=True)
class Lookahead:
    """The nudger's lookahead split into words: leading spaces, then `split(" ")`."""

    space_prefix: str
    words: tuple[str, ...]

    @classmethod
    def split(cls, text: str) -> Lookahead:
        rest = text.lstrip(" ")
        return cls(text[: len(text) - len(rest)], tuple(rest.split(" ")))

    def prefix(self, num_words: int) -> str:
        """The text of the first `num_words` words, as nudging words."""
        return self.space_prefix + " ".join(self.words[:num_words])

    @property
    def last_boundary(self) -> int:
        return len(self.words) - 1


def takes_over(first: Token | None, next_word: str, threshold: float) -> bool:
    """The base takes over when it agrees with the next word or is confident.

    A probe that produced no token has empty text, which is a prefix of any word.
    """
    if first is None:
        return True
    return (" " + next_word).startswith(first.text) or first.top_prob >= threshold


def certain_prefix(tokens: Sequence[Token], threshold: float) -> tuple[list[Token], bool]:
    """Tokens before the first uncertain one, and whether an uncertain one was found."""
    for index, token in enumerate(tokens):
        if token.top_prob < threshold:
            return list(tokens[:index]), True
    return list(tokens), False


def copies_output(text: str, output: str) -> bool:
    """A base chunk of more than five pieces that already occurs in the output is a loop."""
    return len(text.split(" ")) > COPY_MIN_PIECES and text in output


ChunkRule = Literal["chunk_empty", "chunk_repeats", "chunk_copies_output", "uncertain_token"]
DROPPING_RULES: frozenset[ChunkRule] = frozenset({"chunk_empty", "chunk_repeats", "chunk_copies_output"})


@dataclass(frozen=True, slots=True)
class ChunkVerdict:
    """What step 7 does with one chunk of the base's continuation."""

    accepted: tuple[Token, ...]  # the tokens it adds: none when the chunk is dropped
    ends: ChunkRule | None  # the rule that ends the continuation here, if one does
    uncertain: Token | None = None  # the uncertain token that ends it, if one does

    @property
    def dropped(self) -> bool:
        return self.ends in DROPPING_RULES


def judge_chunk(chunk: Sequence[Token], base_text: str, output: str, threshold: float) -> ChunkVerdict:
    """Step 7 (a)-(c) on one chunk.

    `base_text` is this round's base text so far (the paper's `acc`), `output` all the text
    accepted so far (the paper's `out + acc`).
    """
    text = "".join(token.text for token in chunk)
    if text in base_text:
        return ChunkVerdict((), "chunk_repeats" if text else "chunk_empty")
    certain, found_uncertain = certain_prefix(chunk, threshold)
    if copies_output("".join(token.text for token in certain), output):
        return ChunkVerdict((), "chunk_copies_output")
    if found_uncertain:
        return ChunkVerdict(tuple(certain), "uncertain_token", chunk[len(certain)])
    return ChunkVerdict(tuple(certain), None)


class RepetitionGuard:
    """Ends a generation when the same nudging words come back four rounds in a row."""

    def __init__(self) -> None:
        self._last = ""
        self._count = 0

    def repeated(self, nudging_words: str) -> bool:
        if nudging_words == self._last:
            self._count += 1
            return self._count >= REPETITION_LIMIT
        self._last = nudging_words
        self._count = 0
        return False


def _has_repeated_suffix(text: str, length: int) -> bool:
    if length < MIN_REPEATED_SUFFIX:
        return False
    return text[:-length].endswith(text[-length:])


def repeated_suffix_length(text: str) -> int:
    """Length of an immediately repeated suffix, found by the paper's binary search.

    The search assumes the property is monotone in the length, which it is not, so it
    misses many repeats; `paper` fidelity requires exactly this search.
    """
    low, high, found = 0, len(text), 0
    while low <= high:
        middle = (low + high) // 2
        if _has_repeated_suffix(text, middle):
            found = middle
            low = middle + 1
        else:
            high = middle - 1
    return found


def cleaned_bounds(text: str) -> tuple[int, int]:
    """Where the clean-up's text lies in `text`: it strips, then only cuts the end."""
    start = len(text) - len(text.lstrip())
    return start, start + len(clean_repetitions(text))


def clean_repetitions(text: str) -> str:
    """The paper's clean-up: strip, then drop repeated suffixes while the search finds one."""
    text = text.strip()
    while length := repeated_suffix_length(text):
        text = text[:-length]
    return text
