"""Token budgets and stop strings on the merged text, across piece boundaries."""

from __future__ import annotations

from collections.abc import Sequence

from nudging_core.types import Piece


def split_piece(piece: Piece, at: int, *, straddler_in_tail: bool = False) -> tuple[Piece, Piece]:
    """Cut a piece at a character offset; a token straddling the cut counts on one side only
    (the head, unless `straddler_in_tail`)."""
    head_ends: list[int] = []
    tail_ends: list[int] = []
    start = 0
    for end in piece.token_ends:
        in_head = end <= at if straddler_in_tail else start < at
        if in_head:
            head_ends.append(min(end, at))
        else:
            tail_ends.append(max(end - at, 0))
        start = end
    # The tokens that wrote the piece go with their ends: a stop string cuts the logprobs at
    # the token it cuts the text at.
    head_written, tail_written = piece.written[: len(head_ends)], piece.written[len(head_ends):]
    return (
        Piece(piece.text[:at], piece.source, tuple(head_ends), written=head_written),
        Piece(piece.text[at:], piece.source, tuple(tail_ends), written=tail_written),
    )


class Budget:
    """The exact `max_tokens` budget: pieces are cut at token boundaries, never overshoot."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.used = 0

    @property
    def remaining(self) -> int:
        return self.max_tokens - self.used

    @property
    def exhausted(self) -> bool:
        return self.used >= self.max_tokens

    def take(self, piece: Piece) -> Piece:
        taken = piece.truncated(self.remaining)
        self.used += taken.num_tokens
        return taken


class StopFilter:
    """Applies stop strings to a stream of pieces.

    Text that could still be the start of a stop string is held back until it cannot, so
    a stop string split over two pieces is found and never partly sent to the client.
    """

    def __init__(self, stops: Sequence[str], *, whole_tokens: bool = False) -> None:
        self._stops = [s for s in stops if s]
        # Hold back whole tokens (for logprobs: each piece's tokens then cover its text).
        self._whole_tokens = whole_tokens
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending: list[Piece] = []
        self.matched: str | None = None

    def feed(self, piece: Piece) -> list[Piece]:
        """Pieces safe to emit now; after a match, `matched` is set and nothing more passes."""
        if self.matched is not None:
            return []
        if not self._stops:
            return [piece]
        self._pending.append(piece)
        text = "".join(p.text for p in self._pending)
        found = [(text.find(s), s) for s in self._stops if s in text]
        if found:
            position, stop = min(found)
            self.matched = stop
            emitted = self._take(position)
            self._pending = []
            return emitted
        return self._take(max(0, len(text) - self._hold), at_token=self._whole_tokens)

    def flush(self) -> list[Piece]:
        if self.matched is not None:
            return []
        pending, self._pending = self._pending, []
        return pending

    def _take(self, length: int, *, at_token: bool = False) -> list[Piece]:
        """Remove and return the first `length` characters of the pending pieces (with
        `at_token`, only up to the start of a token that goes on past them: text held back
        keeps its tokens whole, so each piece's logprobs cover its text)."""
        taken: list[Piece] = []
        while self._pending and length > 0:
            piece = self._pending[0]
            if len(piece.text) <= length:
                taken.append(self._pending.pop(0))
                length -= len(piece.text)
            else:
                if at_token:
                    length = max((end for end in piece.token_ends if end <= length), default=0)
                    if length == 0:
                        break
                head, tail = split_piece(piece, length)
                taken.append(head)
                self._pending[0] = tail
                length = 0
        return [p for p in taken if p.text or p.num_tokens]
