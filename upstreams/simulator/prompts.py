"""Find the question and the answer so far in the text a simulated model is asked to continue.

The simulated models are functions of the *text* only: the proxy re-sends growing prompts, and
a model must continue the same way whether a piece of text arrived in the prompt or was
generated. So the split between question and answer is recomputed from the whole text.

* Chat-templated text (ChatML, Llama-2, Llama-3, Gemma, OLMo/Tulu markers): the answer is the
  text after the last assistant marker, the question is everything before it.
* Plain text (a base model's prompt such as ``"{system}\\n{user}\\n{answer_start}"``): the answer
  starts at the earliest line start or answer-start word ("Sure", "Question", ...) from which
  the text reads like something the simulated models would write at an answer start (checked
  by a callback of the model, over the first few tokens), or after a line-start label such as
  ``"Answer:"``, or at the end of a line that ends the text. Without such a place the whole
  text is the question and the answer is empty.

The question's identity (its *key*) is its text with template markers, role labels and extra
whitespace removed, lowercased; the base prompt ``"You are kind.\\nHi there\\n"`` and the chat
prompt with that system and user message therefore name the same question, for every template.

The markers below are written from the template families' published layouts, not derived from
the proxy's `nudging_core.templates`: the simulator stands in for a model, which reads the text
it is given, so a template the proxy renders wrongly makes a simulated answer go wrong as it
would on a real model, instead of agreeing with the proxy by construction.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .tokenizer import normal_form, tokenize

# The last match is where the assistant's answer starts.
_ASSISTANT_MARKER: Final = re.compile(
    r"<\|im_start\|>assistant[^\S\n]*\n?"
    r"|<\|start_header_id\|>assistant<\|end_header_id\|>(?:\n\n)?"
    r"|<start_of_turn>model[^\S\n]*\n?"
    r"|<\|assistant\|>[^\S\n]*\n?"
    r"|\[/INST\]"
)
_ROLE_HEADER: Final = re.compile(
    r"<\|im_start\|>[^\S\n]*(?:system|user|assistant|tool)\b"
    r"|<\|start_header_id\|>[^<]*<\|end_header_id\|>"
    r"|<start_of_turn>[^\S\n]*(?:user|model|system)\b"
)
_SPECIAL_TOKEN: Final = re.compile(
    r"<\|[^<>|\s]{1,40}\|>|</?s>|<bos>|<eos>|<end_of_turn>|\[/?INST\]|<</?SYS>>"
)
_QUESTION_LABEL: Final = re.compile(
    r"^(?:#+\s*)?(?:question|q|user|human|instruction|system|input)\s*:\s*", re.IGNORECASE
)
# A line starting with one of these introduces the answer in plain prompts.
_ANSWER_LABEL: Final = re.compile(
    r"(?:#+[^\S\n]*)?(?:Answer|A|Response|Assistant|Output|Solution)[^\S\n]*:"
)
# Words that can start an answer of the simulated models (documents.ANSWER_START_WORDS, and
# the base's "Question"), also where no line break precedes them.
_START_WORD: Final = re.compile(
    r"(?<![A-Za-z0-9'])(?: ?)(?:sure|certainly|absolutely|great|question)(?![A-Za-z0-9'])",
    re.IGNORECASE,
)

CHECKED_TOKENS: Final = 6  # answer tokens the plausibility check looks at
_WINDOW_CHARS: Final = 400


@dataclass(frozen=True, slots=True)
class Question:
    text: str  # cleaned, case kept, one line per non-empty line
    key: str  # the identity: lowercased, whitespace collapsed

    @property
    def last_line(self) -> str:
        return self.text.rsplit("\n", 1)[-1]


@dataclass(frozen=True, slots=True)
class Split:
    question: Question
    answer_start: int  # offset in the text where the answer begins
    templated: bool  # found by an assistant marker (stable as the text grows)


def clean_question(text: str) -> Question:
    text = _ROLE_HEADER.sub("\n", text)
    text = _SPECIAL_TOKEN.sub("\n", text)
    lines: list[str] = []
    for raw in text.split("\n"):
        line = " ".join(raw.split())
        line = _QUESTION_LABEL.sub("", line).strip()
        if line:
            lines.append(line)
    cleaned = "\n".join(lines)
    return Question(cleaned, " ".join(cleaned.split()).lower())


def answer_forms(text: str, *, drop_last: bool) -> list[str]:
    """Normal forms of the first tokens of `text` (space-only tokens left out)."""
    tokens = tokenize(text)
    if drop_last and tokens:
        tokens.pop()  # the window may have cut this token
    forms: list[str] = []
    for token in tokens:
        form = normal_form(token)
        if form is not None:
            forms.append(form)
            if len(forms) == CHECKED_TOKENS:
                break
    return forms


StartFilter = Callable[[list[str]], bool]
StartCheck = Callable[[Question, list[str]], bool]


def _candidates(text: str) -> list[int]:
    points: set[int] = set()
    for match in re.finditer("\n", text):
        points.add(match.end())
    for match in _START_WORD.finditer(text):
        points.add(match.start())
    return sorted(p for p in points if p > 0)


def split_text(text: str, could_start: StartFilter, starts_answer: StartCheck) -> Split:
    """Split `text` into question and answer.

    `could_start` is a cheap filter on the normal forms of the first answer tokens;
    `starts_answer` confirms that the simulated models could have written them after the question.
    """
    markers = list(_ASSISTANT_MARKER.finditer(text))
    if markers:
        last = markers[-1]
        return Split(clean_question(text[: last.start()]), last.end(), True)
    for point in _candidates(text):
        answer_from = point
        labelled = False
        if text[point - 1] == "\n":
            label = _ANSWER_LABEL.match(text, point)
            if label is not None:
                answer_from, labelled = label.end(), True
        window = text[answer_from : answer_from + _WINDOW_CHARS]
        forms = answer_forms(window, drop_last=answer_from + _WINDOW_CHARS < len(text))
        if forms and not could_start(forms):
            continue
        if not forms and not labelled and answer_from < len(text):
            continue  # only spaces follow: not a place an answer starts
        question = clean_question(text[:point])
        if not question.key:
            continue
        if forms and not starts_answer(question, forms):
            continue
        return Split(question, answer_from, False)
    return Split(clean_question(text), len(text), False)


class SplitCache:
    """Recently split texts (the proxy re-sends texts, e.g. for echo scoring and retries)."""

    def __init__(self, capacity: int = 512) -> None:
        self._entries: OrderedDict[str, Split] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()  # servers of several profiles may share a process

    def get(self, text: str) -> Split | None:
        with self._lock:
            split = self._entries.get(text)
            if split is not None:
                self._entries.move_to_end(text)
            return split

    def put(self, text: str, split: Split) -> None:
        with self._lock:
            self._entries[text] = split
            if len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
