"""Turning generated token bytes into text the client may see.

Two concerns, both independent of the model: UTF-8 characters that span several tokens (a
byte-fallback tokenizer emits one token per byte of a rare character) and stop strings, whose
possible beginnings must be held back while streaming so that a stop string is never sent.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass


class Utf8Pieces:
    """Decodes token byte pieces one at a time, never splitting a character.

    A piece that ends inside a multi-byte character contributes "" (or its complete prefix) and
    the bytes wait for the next piece, which then carries the whole character. Bytes that can
    never form a character are replaced by U+FFFD, as any UTF-8 decoder does; an incomplete
    character still pending when generation ends is dropped, since half a character cannot be
    shown (and a proxy re-sending the text could not encode it either).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece, final=False)

    @property
    def pending(self) -> bool:
        """Whether bytes of an unfinished character are waiting."""
        buffered, _ = self._decoder.getstate()
        return bool(buffered)


def piece_label(piece: bytes) -> str:
    """A token's own string for `top_logprobs` keys.

    A token that is not valid UTF-8 on its own (one byte of a multi-byte character) is shown
    as ``bytes:\\xe2\\x80`` rather than U+FFFD, so distinct byte tokens keep distinct keys.
    """
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


@dataclass(frozen=True, slots=True)
class StopHit:
    index: int  # where the stop string starts in the text
    stop: str


class StopStrings:
    """Finds stop strings in growing text and says how much text is safe to release."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_chars: int) -> StopHit | None:
        """The earliest stop string that the last `new_chars` characters complete or contain.

        Earliest by position (not by request order): the text is cut at the first place any
        stop string occurs.
        """
        if not self.stops or new_chars <= 0:
            return None
        start = max(0, len(text) - new_chars - self._longest + 1)
        best: StopHit | None = None
        for stop in self.stops:
            index = text.find(stop, start)
            if index != -1 and (best is None or index < best.index):
                best = StopHit(index, stop)
        return best

    def releasable(self, text: str, released: int) -> int:
        """End of the text that can be sent: everything but a tail that may begin a stop string."""
        if not self.stops:
            return len(text)
        hold = 0
        # The longest suffix of the unreleased text that is a proper prefix of a stop string.
        for length in range(min(self._longest - 1, len(text) - released), 0, -1):
            tail = text[len(text) - length:]
            if any(stop.startswith(tail) for stop in self.stops):
                hold = length
                break
        return len(text) - hold
