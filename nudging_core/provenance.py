"""Which model wrote which text: merged spans, tokens per source and the paper's word-level
nudging ratio."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nudging_core.types import Piece, Source


@dataclass(frozen=True, slots=True)
class Span:
    text: str
    source: Source


def merge_spans(pieces: Iterable[Piece]) -> list[Span]:
    """Consecutive pieces of one source joined into one span; empty pieces dropped."""
    spans: list[Span] = []
    for piece in pieces:
        if not piece.text:
            continue
        if spans and spans[-1].source == piece.source:
            spans[-1] = Span(spans[-1].text + piece.text, piece.source)
        else:
            spans.append(Span(piece.text, piece.source))
    return spans


def tokens_by_source(pieces: Iterable[Piece]) -> dict[Source, int]:
    counts: dict[Source, int] = {"base": 0, "nudging": 0}
    for piece in pieces:
        counts[piece.source] += piece.num_tokens
    return counts


def nudging_word_ratio(spans: Iterable[Span]) -> float:
    """Words the nudger supplied over all words, each counted by whitespace splitting as the
    paper counts them (a word split across two spans counts in both)."""
    spans = list(spans)
    total = len("".join(span.text for span in spans).split())
    if total == 0:
        return 0.0
    nudged = sum(len(span.text.split()) for span in spans if span.source == "nudging")
    return min(1.0, nudged / total)
