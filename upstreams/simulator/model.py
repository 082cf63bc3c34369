"""The simulated language models: next-token distributions that depend only on the text.

For a text, the model (1) splits it into question and answer so far (prompts.py), (2) takes
the profile's document for the question (documents.py), (3) locates the end of the answer in
it (ngram.py) and predicts the token found there with the confidence annotated at that
position, plus a few deterministic alternatives sharing the rest of the probability mass.

When the answer cannot be located (text the profile would not write, e.g. the other model's
glue), the model backs off:

* ``base`` and ``aligned-base`` continue with the first content sentence after the last one
  already written, unsure (top-1 at most 0.35); after all content, their ramble; a base that
  answers briefly (its document ends with EOS) stops instead, confidently, once all content
  is written and a sentence has just ended, whoever wrote it;
* ``aligned`` behaves like a chat model that re-reads the conversation: it continues after
  the last of its landmarks (segments of three or more tokens: opener, content sentences,
  list numbers, closing, ...) found in the answer, skipping the glue it has already written
  since (a marker, a blank line), so it never loops on a marker; moderately sure
  (0.45-0.65); after its closing, EOS. Only the song and laugh documents end in a loop.

Emitted tokens never change the tokens before them when re-tokenized (tokenizer.can_follow),
so the text a request generates re-tokenizes into the tokens it reported; the only exception
is a prompt ending in a single space, which the next word absorbs (the model then writes the
word without its leading space).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from .documents import ANSWER_START_WORDS, EOS, PROFILES, document_for
from .ngram import BOS_ID, Answer, Corpus, token_id
from .prompts import Question, Split, SplitCache, split_text
from .tokenizer import can_follow, is_space_token, is_word_char, normal_form, tokenize

Distribution = list[tuple[str, float]]

_BASE_BACKOFF_MAX: Final = 0.35
_ALIGNED_BACKOFF: Final = (0.45, 0.65)
_FREEZE_AFTER: Final = 8  # answer tokens after which a plain-text split can no longer move
_ALTERNATIVE_DECAY: Final = 0.6
_PUNCTUATION_ALTERNATIVES: Final = (",", ".", "\n", " and", " the")
_EOS_ALTERNATIVES: Final = ("\n", " I", " Let")

_SENTENCE_END_IDS: Final = frozenset(token_id(form) for form in (".", "!", "?"))

# Every profile's candidates at an answer start are among these (documents.py keeps it so).
_FIRST_FORMS: Final = frozenset({"question"} | {w.lower() for w in ANSWER_START_WORDS})


@lru_cache(maxsize=1536)
def corpus_for(question: Question, profile: str) -> Corpus:
    return Corpus(document_for(question, profile))


@dataclass(frozen=True, slots=True)
class Prediction:
    position: int
    confidence: float
    recognised: bool  # False when the model backed off


def predict(corpus: Corpus, context: list[int]) -> Prediction:
    """Where in the document the answer continues. `context` starts with BOS."""
    answer = Answer(context)
    found = corpus.match(context, answer)
    if found is not None:
        return Prediction(found.position, corpus.confidence[found.position], True)
    if corpus.profile == "aligned":
        # Without a landmark, start afresh; but never restart the opener over written words.
        wordless = not any(corpus.is_word_id(i) for i in context[1:])
        position = 1 if wordless or not corpus.landmarks else corpus.landmarks[0][1]
        for (_, end), key in zip(reversed(corpus.landmarks), reversed(corpus.landmark_keys),
                                     strict=True):
            if key in answer.key:
                position = end
                break
        position = min(position, len(corpus.ids) - 1)
        # Resume where the text left the document: glue already written after the landmark
        # (a marker, a blank line) is not written again.
        position += corpus.progress(context, position, across=True)
        low, high = _ALIGNED_BACKOFF
        return Prediction(position, min(max(corpus.confidence[position], low), high), False)
    written = [n for n in corpus.content_keys if corpus.written(n, answer)]
    following = max(written) + 1 if written else 0
    if (following not in corpus.content_start and corpus.eos_position is not None
            and context[-1] in _SENTENCE_END_IDS):
        # All content is written and a sentence has just ended: a base that knows how to stop
        # (a brief answer) stops here, whoever wrote the sentence.
        return Prediction(corpus.eos_position, corpus.confidence[corpus.eos_position], False)
    position = corpus.content_start.get(following, corpus.after_content)
    position = min(position, len(corpus.ids) - 1)
    position += corpus.progress(context, position)
    return Prediction(position, min(corpus.confidence[position], _BASE_BACKOFF_MAX), False)


def _pick(seed: str, pool: Sequence[str], count: int, exclude: str) -> list[str]:
    """`count` distinct members of `pool` other than `exclude`, chosen by a stable hash."""
    digest = hashlib.blake2b(seed.encode(), digest_size=16).digest()
    chosen: list[str] = []
    for i in range(len(digest)):
        if len(chosen) == count:
            break
        word = pool[digest[i] % len(pool)]
        if word != exclude and word not in chosen:
            chosen.append(word)
    return chosen


def alternatives(corpus: Corpus, position: int) -> tuple[str, ...]:
    """Other tokens the model considers at a document position (raw forms)."""
    known = corpus.alternatives_cache.get(position)
    if known is None:
        known = corpus.alternatives_cache[position] = _alternatives(corpus, position)
    return known


def _alternatives(corpus: Corpus, position: int) -> tuple[str, ...]:
    given = corpus.alternatives.get(position)
    if given is not None:
        return given
    token = corpus.tokens[position]
    if token == EOS:
        return _EOS_ALTERNATIVES
    seed = f"{corpus.profile}:{position}:{token}"
    if any(is_word_char(c) for c in token):
        bare = token.lstrip(" ")
        words = _pick(seed, corpus.words, 3, bare.lower())
        if bare[:1].isupper():
            words = [w.capitalize() for w in words]
        prefix = " " if token.startswith(" ") else ""
        return tuple(prefix + w for w in words)
    return tuple(_pick(seed, _PUNCTUATION_ALTERNATIVES, 3, token))


def with_probabilities(top: str, confidence: float, others: Sequence[str]) -> Distribution:
    """The top token with `confidence`; the others share part of the rest, each below it."""
    weights = [_ALTERNATIVE_DECAY ** (k + 1) for k in range(len(others))]
    total = sum(weights)
    share = min((1.0 - confidence) * 0.9, confidence * total) if total else 0.0
    result = [(top, confidence)]
    result.extend((token, share * w / total) for token, w in zip(others, weights, strict=True))
    return result


# ---------------------------------------------------------------------------------------------
# Where does the answer start? A plain-text answer starts where the simulated models could have
# started writing it; the check runs every profile over the first few answer tokens.

_start_memo: dict[tuple[str, tuple[str, ...]], bool] = {}


def _could_start(forms: list[str]) -> bool:
    return forms[0] in _FIRST_FORMS


def _candidate_forms(question: Question, prefix: tuple[str, ...]) -> set[str]:
    context = [BOS_ID] + [token_id(form) for form in prefix]
    forms: set[str] = set()
    for profile in PROFILES:
        corpus = corpus_for(question, profile)
        position = predict(corpus, context).position
        for token in (corpus.tokens[position], *alternatives(corpus, position)):
            form = normal_form(token) if token != EOS else None
            if form is not None:
                forms.add(form)
    return forms


def _starts_answer(question: Question, forms: list[str]) -> bool:
    if len(_start_memo) > 100_000:
        _start_memo.clear()
    for k in range(len(forms)):
        memo_key = (question.key, tuple(forms[: k + 1]))
        known = _start_memo.get(memo_key)
        if known is None:
            known = forms[k] in _candidate_forms(question, tuple(forms[:k]))
            _start_memo[memo_key] = known
        if not known:
            return False
    return True


_splits = SplitCache()


def split(text: str) -> Split:
    found = _splits.get(text)
    if found is None:
        found = split_text(text, _could_start, _starts_answer)
        _splits.put(text, found)
    return found


# ---------------------------------------------------------------------------------------------


class Cursor:
    """The model's view of one growing text: next distribution, then advance by a token.

    Equivalent to calling :meth:`LanguageModel.next_distribution` on the whole text each time,
    but incremental once the question/answer split can no longer change.
    """

    def __init__(self, model: LanguageModel, text: str) -> None:
        self._model = model
        self._text = text
        self._frozen = False
        self._resplit()

    @property
    def text(self) -> str:
        return self._text

    @property
    def question(self) -> Question:
        return self._split.question

    def _resplit(self) -> None:
        self._split = split(self._text)
        start = self._split.answer_start
        self._answer = tokenize(self._text[start:])
        self._ids = [BOS_ID]
        for token in self._answer:
            form = normal_form(token)
            if form is not None:
                self._ids.append(token_id(form))
        self._frozen = self._split.templated or len(self._ids) > _FREEZE_AFTER
        self._corpus = self._model.corpus(self._split.question)

    def advance(self, token: str) -> None:
        self._text += token
        if not self._frozen:
            self._resplit()
            return
        tail = self._answer.pop() if self._answer else ""
        if tail and normal_form(tail) is not None:
            self._ids.pop()
        for piece in tokenize(tail + token):
            self._answer.append(piece)
            form = normal_form(piece)
            if form is not None:
                self._ids.append(token_id(form))

    def _previous_token(self) -> str:
        if self._answer:
            return self._answer[-1]
        start = self._split.answer_start
        before = tokenize(self._text[max(0, start - 256) : start])
        return before[-1] if before else ""

    def _emit(self, token: str, previous: str) -> str | None:
        """`token` as written after `previous` without changing the tokens before it."""
        if is_space_token(previous):
            # The text ends in spaces: the next word brings no space of its own.
            token = token[1:] if token.startswith(" ") and not is_space_token(token) else token
            return token or None
        if not self._answer:
            start = self._split.answer_start
            if start > 0 and not self._text[start - 1].isspace() and not token[:1].isspace():
                token = " " + token  # "Answer:" or "[/INST]" is followed by " Sure"
        if can_follow(previous, token):
            return token
        if token[:1] != " " and can_follow(previous, " " + token):
            return " " + token
        return None

    def distribution(self) -> Distribution:
        corpus = self._corpus
        prediction = predict(corpus, self._ids)
        p = prediction.position
        token = corpus.tokens[p]
        previous = self._previous_token()
        if token == EOS:
            return with_probabilities(EOS, prediction.confidence, _EOS_ALTERNATIVES)
        space = corpus.space_before[p]
        if space and not is_space_token(previous) and self._answer:
            # The document has a run of spaces here ("end.  Next"): write it first.
            confidence = (corpus.space_confidence[p] if prediction.recognised
                          else prediction.confidence)
            bare = token.lstrip(" ")
            return with_probabilities(space, confidence, [" " + bare] if bare else [])
        top = self._emit(token, previous)
        others: list[str] = []
        for alternative in alternatives(corpus, p):
            emitted = self._emit(alternative, previous)
            if emitted is not None and emitted != top and emitted not in others:
                others.append(emitted)
        if top is None:
            # Cannot be written here (it would merge with the text): the model is unsure.
            if not others:
                return with_probabilities(EOS, 0.5, [])
            top, others = others[0], others[1:]
            return with_probabilities(top, min(prediction.confidence, _BASE_BACKOFF_MAX), others)
        return with_probabilities(top, prediction.confidence, others)


class LanguageModel:
    """One simulated model: ``base``, ``aligned`` or ``aligned-base``."""

    def __init__(self, profile: str) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        self.profile = profile

    def corpus(self, question: Question) -> Corpus:
        return corpus_for(question, self.profile)

    def start(self, text: str) -> Cursor:
        return Cursor(self, text)

    def next_distribution(self, prompt_text: str, generated: Sequence[str] = ()) -> Distribution:
        """Candidates for the next token after `prompt_text` + `generated`, most likely first.

        Probabilities sum to at most 1 (the rest is unlisted tokens); :data:`EOS` ends the text.
        Only the concatenated text matters, not where the prompt ends.
        """
        return self.start(prompt_text + "".join(generated)).distribution()

    def prompt_distributions(self, text: str) -> list[tuple[str, Distribution | None]]:
        """Each token of `text` with the distribution it was drawn from (None for the first).

        Positions inside the answer part of the text get the model's real distribution at that
        prefix (what a request for that prefix would return); positions inside the question
        get a cheap deterministic stand-in, since the model only models answers.
        """
        tokens = tokenize(text)
        answer_start = split(text).answer_start
        result: list[tuple[str, Distribution | None]] = []
        offset = 0
        previous = ""
        for i, token in enumerate(tokens):
            if i == 0:
                result.append((token, None))
            elif offset >= answer_start:
                result.append((token, self.start(text[:offset]).distribution()))
            else:
                result.append((token, _reading_distribution(previous, token)))
            previous = token
            offset += len(token)
        return result


def _reading_distribution(previous: str, token: str) -> Distribution:
    digest = hashlib.blake2b(f"{previous}\x00{token}".encode(), digest_size=8).digest()
    probability = 0.05 + 0.9 * digest[0] / 255
    fillers = [t for t in (" the", ",", "\n", ".") if t != token][:3]
    rest = 1.0 - probability
    shares = zip(fillers, (0.4, 0.2, 0.1), strict=True)  # four candidates less `token`, cut to 3
    entries = [(token, probability)] + [(t, rest * s) for t, s in shares]
    return sorted(entries, key=lambda e: -e[1])


def logprob(probability: float) -> float:
    return math.log(probability) if probability > 0 else -9999.0
