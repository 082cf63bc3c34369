"""Locating a text in a document: an infinite-gram over normalised tokens.

A :class:`Corpus` indexes one document. To continue a text, the model looks for the document
positions whose preceding tokens match the end of the answer so far, longest match first, and
predicts the token found there. A match counts only if it *recognises* the position:

* inside a segment, the match must reach back to the segment's start and contain two words,
  or one word right after a boundary such as "." or "," that starts a content sentence not
  yet written (so "However, the capital" and "However, the" find the sentence
  "The capital ..." after any glue, while "Here is a" does not find a sentence starting with
  "A"), or be at least ``STRONG`` tokens long;
* at a segment start, the match must cover the whole previous segment plus one token before
  it and contain a word, or reach back to the answer start, or be ``STRONG`` tokens long:
  "." or ".\\n\\n" alone says nothing about which sentence comes next.

Tokens are compared by their normal form (lowercase, no leading space, space-only tokens
skipped), so double spaces and capitalisation after a marker do not lose the place. Index 0 of
every sequence is a beginning-of-answer symbol, so the answer start is matched too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

from .documents import EOS, Document
from .tokenizer import is_space_token, is_word_char, normal_form

STRONG: Final = 6  # a match this long is trusted anywhere
MAX_MATCH: Final = 64  # longer matches do not change a decision; bounds the work per token

BOS_ID: Final = 0
EOS_ID: Final = 1
_ids: dict[str, int] = {}
_word_ids: set[int] = set()
_ids_lock = threading.Lock()  # simulators of several profiles may share a process


def token_id(form: str) -> int:
    """A small integer for a normal form, shared by all corpora of the process."""
    found = _ids.get(form)
    if found is None:
        with _ids_lock:
            found = _ids.get(form)
            if found is None:
                found = len(_ids) + 2
                if any(is_word_char(c) for c in form):
                    _word_ids.add(found)
                _ids[form] = found
    return found


BOUNDARY_IDS: Final = frozenset(
    {BOS_ID} | {token_id(form) for form in (".", "!", "?", ":", ";", ",", "\n")}
)


@dataclass(frozen=True, slots=True)
class Match:
    position: int
    length: int


class Corpus:
    """A document as arrays indexed by position (position 0 is the beginning of the answer)."""

    def __init__(self, doc: Document) -> None:
        self.profile = doc.profile
        self.words = doc.words
        ids = [BOS_ID]
        tokens = [""]
        space_before = [""]
        space_confidence = [0.0]
        confidence = [1.0]
        segment = [-1]
        content = [-1]
        alternatives: dict[int, tuple[str, ...]] = {}
        pending_space = ""
        pending_confidence = 0.0
        for i, token in enumerate(doc.tokens):
            if token != EOS and is_space_token(token):
                # Space runs are emitted, but matched as part of the next token.
                pending_space, pending_confidence = token, doc.confidence[i]
                continue
            form = normal_form(token) if token != EOS else None
            ids.append(EOS_ID if token == EOS else token_id(form or ""))
            tokens.append(token)
            space_before.append(pending_space)
            space_confidence.append(pending_confidence)
            confidence.append(doc.confidence[i])
            segment.append(doc.segment[i])
            content.append(doc.content[i])
            if i in doc.alternatives:
                alternatives[len(ids) - 1] = doc.alternatives[i]
            pending_space = ""
        self.ids = ids
        self.tokens = tokens
        self.space_before = space_before
        self.space_confidence = space_confidence
        self.confidence = confidence
        self.content = content
        self.alternatives = alternatives
        self.alternatives_cache: dict[int, tuple[str, ...]] = {}
        size = len(ids)
        # Per position: where its segment starts, how many words of its segment precede it,
        # and (at segment starts) how long the previous segment is.
        self.segment_start = [0] * size
        self.words_before = [0] * size
        self.word_prefix = [0] * (size + 1)  # word tokens before each position
        self.previous_length = [0] * size
        self.segment_starts: dict[int, int] = {}
        start = 0
        previous_start = 0
        words = 0
        for p in range(1, size):
            if segment[p] != segment[p - 1]:
                previous_start, start, words = start, p, 0
                self.segment_starts[segment[p]] = p
                self.previous_length[p] = p - previous_start if previous_start > 0 else 0
            self.segment_start[p] = start
            self.words_before[p] = words
            is_word = tokens[p] != EOS and any(is_word_char(c) for c in tokens[p])
            words += is_word
            self.word_prefix[p + 1] = self.word_prefix[p] + is_word
        self.occurrences: dict[int, list[int]] = {}
        for q in range(size - 1):  # the last position has nothing after it
            self.occurrences.setdefault(ids[q], []).append(q)
        self.content_start: dict[int, int] = {}
        for p in range(1, size):
            if content[p] >= 0 and content[p] not in self.content_start:
                self.content_start[content[p]] = p
        self.content_keys = {
            number: _key(ids[p : self._segment_end(p)]) for number, p in self.content_start.items()
        }
        # Segments the aligned model can find its place by: every segment of three or more
        # tokens (opener, sentences, list numbers, rule, URL, closing) in document order.
        self.landmarks: list[tuple[int, int]] = []  # (start, end) positions
        for index in sorted(self.segment_starts):
            start = self.segment_starts[index]
            end = self._segment_end(start)
            if end - start >= 3:
                self.landmarks.append((start, end))
        self.landmark_keys = [_key(ids[s:e]) for s, e in self.landmarks]
        self.eos_position = ids.index(EOS_ID) if EOS_ID in ids else None
        last_content = max(self.content_start, default=-1)
        self.after_content = (
            self._segment_end(self.content_start[last_content]) if last_content >= 0 else 1
        )

    def _segment_end(self, p: int) -> int:
        start = self.segment_start[p]
        end = p
        while end < len(self.ids) and self.segment_start[end] == start:
            end += 1
        return end

    @staticmethod
    def is_word_id(token: int) -> bool:
        return token in _word_ids

    def progress(self, context: list[int], position: int, *, across: bool = False) -> int:
        """How many tokens of the segment starting at `position` end the context already.

        With `across`, the tokens may run on into the following segments (a marker such as
        "Finally," and then the first words of the sentence after it).
        """
        end = min(len(self.ids), position + MAX_MATCH) if across else self._segment_end(position)
        ids = self.ids
        for j in range(min(end - position - 1, len(context) - 1), 0, -1):
            if context[len(context) - j :] == ids[position : position + j]:
                return j
        return 0

    def written(self, number: int, answer: Answer) -> bool:
        """Whether content sentence `number` occurs in the answer."""
        return self.content_keys[number] in answer.key

    def match(self, context: list[int], answer: Answer) -> Match | None:
        """The longest recognising match of the end of `context` (which starts with BOS).

        Between equally long matches, a content sentence not yet in the answer wins, then the
        earliest position. A match that covers only the start of a segment and the boundary
        token before it (". The") counts as long as the start alone: "." says nothing about
        which sentence came before.
        """
        last = len(context) - 1
        best: list[int] = []
        best_length = 0
        ids = self.ids
        for q in self.occurrences.get(context[last], ()):
            limit = min(q, last, MAX_MATCH - 1)
            k = 1
            while k <= limit and context[last - k] == ids[q - k]:
                k += 1
            p = q + 1
            start = self.segment_start[p]
            inside = p - start
            # Weak: the segment start plus at most one token before it, not back to the answer
            # start (k == p) and not STRONG.
            weak = 0 < inside and k <= inside + 1 and k < min(STRONG, p)
            length = inside if weak else k
            if length < best_length:
                continue
            if k >= STRONG:
                ok = True
            elif inside > 0:
                words = self.words_before[p]
                # One word is enough only to recognise content not written yet after a boundary.
                ok = k >= inside and (
                    words >= 2
                    or (
                        words == 1
                        and (
                            not weak
                            or (
                                context[last - inside] in BOUNDARY_IDS
                                and self.content[p] >= 0
                                and not self.written(self.content[p], answer)
                            )
                        )
                    )
                )
            else:
                ok = k >= self.previous_length[p] + 1 and (
                    k >= p or self.word_prefix[p] > self.word_prefix[p - k]  # anchored, or a word
                )
            if ok:
                if length > best_length:
                    best, best_length = [p], length
                else:
                    best.append(p)
        if not best:
            return None
        if len(best) > 1:
            for p in best:
                number = self.content[p]
                if number >= 0 and not self.written(number, answer):
                    return Match(p, best_length)
        return Match(best[0], best_length)


def _key(ids: list[int]) -> str:
    return "\x1f" + "\x1f".join(map(str, ids)) + "\x1f"


class Answer:
    """The answer so far as a searchable string of token ids, built only when needed."""

    def __init__(self, context: list[int]) -> None:
        self._context = context
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = _key(self._context[1:])
        return self._key
