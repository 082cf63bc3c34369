"""Judge-free scoring: rule-based answer extraction and format metrics.

The paper judged most datasets with an LLM (rule-based only for the math sets); here every
answer type has an extractor (`ours`), and `judge.py` is the optional LLM judge. Extraction
reads the answer up to where it runs on into a new question or turn (a base model often
writes the next exam question after its answer; its numbers are not the answer). Scoring
`paper` applies the paper's own math rule (`paper_rules.py`) to the math sets instead and
ours elsewhere, where the paper asked its judge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .datasets import AnswerType, Sample
from .paper_rules import paper_last_number, paper_math_correct

Scoring = Literal["ours", "paper"]

# A new question or chat turn the model started writing by itself.
RUN_ON = re.compile(
    r"(?:\A|\n)\s*(?:Question|Q|Instruction|User|Human|Input|Problem)\s*:"
    r"|(?:\A|\n)\s*Answer the question by walking"
    r"|<\|im_start\|>|<\|user\|>|<start_of_turn>|\[INST\]|<\|start_header_id\|>|<\|endoftext\|>"
)
NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# "3. Dan has 12 stickers": the number of a list item, not a quantity.
LIST_MARKER = re.compile(r"(?m)^[ \t]*\d{1,2}[.)](?=[ \t]+\S)")
DATE = re.compile(r"(?<!\d)(\d{1,2})/(\d{1,2})/(\d{4})(?!\d)")
# Answer words, strongest first: a later group is read only when no word of an earlier one is
# there (an explicit "no" beats "heads" in "No, it is not still heads up").
YES_NO = ({"yes": "yes", "no": "no"}, {"plausible": "yes", "implausible": "no", "not plausible": "no"})
TRUE_FALSE = ({"true": "true", "false": "false", "yes": "true", "no": "false"},)
COIN = (
    {"yes": "yes", "no": "no"},
    {"heads": "yes", "tails": "no", "not heads": "no", "not still heads": "no"},
)
# A question the model restates ("Is the coin still heads up?") holds no answer.
QUESTION_SENTENCE = re.compile(r"[^.!?\n]*\?")
DEFAULT_LABELS = ("A", "B", "C", "D", "E")


@dataclass(frozen=True, slots=True)
class Score:
    extracted: str | None
    correct: bool | None  # None: rules cannot tell (judged datasets)


def answer_part(output: str) -> str:
    """The output up to the first run-on into a new question or turn."""
    found = RUN_ON.search(output)
    return output[: found.start()] if found else output


def ran_on(output: str) -> bool:
    return RUN_ON.search(output) is not None


def canonical_number(text: str) -> str | None:
    try:
        number = float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() else repr(number)


def last_number(text: str) -> str | None:
    """The last number, read with thousands commas, decimals, a sign and units around it:
    "$1,234.50" -> "1234.5", "-3 degrees" -> "-3", "18.00." -> "18"; list item numbers
    ("4. Dan has ...") do not count."""
    numbers = NUMBER.findall(LIST_MARKER.sub(" ", text))
    return canonical_number(numbers[-1]) if numbers else None


def _last_word(text: str, groups: tuple[dict[str, str], ...]) -> str | None:
    """The last answer word of the strongest group present, outside restated questions."""
    statements = QUESTION_SENTENCE.sub(" ", text)
    for mapping in groups:
        # Longest phrases first, so "not plausible" wins over "plausible".
        words = sorted(mapping, key=len, reverse=True)
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        found = pattern.findall(statements)
        if found:
            return mapping[found[-1].lower()]
    return None


def choice_letter(text: str, labels: tuple[str, ...] = DEFAULT_LABELS) -> str | None:
    """The chosen option: "the answer is (C)" first, then "(C)", then a label standing alone
    before punctuation or the end ("... so B."), never the article "A" in "A coin"."""
    options = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    patterns = (
        rf"(?i:answer)(?:\s+is)?\s*[:\-]?\s*(?:(?i:option|choice)\s*)?\(?({options})\)?(?![\w'])",
        rf"\(({options})\)",
        rf"(?<![\w'])({options})(?=[.):,]?\s*$|[.):,]\s)",
    )
    for pattern in patterns:
        found = re.findall(pattern, text)
        if found:
            return str(found[-1])
    return None


def last_letters(text: str) -> str | None:
    """The concatenated letters: after "answer is", else the last quoted word, else the last word."""
    for pattern in (
        r"(?i:answer is)[:\s]*[\"'“]?([A-Za-z]+)",
        r"[\"'“]([A-Za-z]+)[\"'”]",
        r"\b([A-Za-z]+)\b",
    ):
        found = re.findall(pattern, text)
        if found:
            return str(found[-1]).lower()
    return None


def canonical_date(text: str) -> str | None:
    found = DATE.findall(text)
    if not found:
        return None
    month, day, year = found[-1]
    return f"{int(month):02d}/{int(day):02d}/{year}"


def extract(answer_type: AnswerType, text: str, labels: tuple[str, ...] = ()) -> str | None:
    if answer_type == "number":
        return last_number(text)
    if answer_type == "choice":
        return choice_letter(text, labels or DEFAULT_LABELS)
    if answer_type == "yes_no":
        return _last_word(text, YES_NO)
    if answer_type == "true_false":
        return _last_word(text, TRUE_FALSE)
    if answer_type == "coin_flip":
        return _last_word(text, COIN)
    if answer_type == "last_letters":
        return last_letters(text)
    if answer_type == "date":
        return canonical_date(text)
    return None


def _same(answer_type: AnswerType, extracted: str, gold: str) -> bool:
    if answer_type == "number":
        gold_number = canonical_number(gold)
        return gold_number is not None and abs(float(extracted) - float(gold_number)) < 1e-6
    if answer_type == "date":
        return extracted == canonical_date(gold)
    return extracted.lower() == gold.lower()


def score(answer_type: AnswerType, output: str, gold: str, labels: tuple[str, ...] = ()) -> Score:
    if answer_type == "judged":
        return Score(None, None)
    extracted = extract(answer_type, answer_part(output), labels)
    return Score(extracted, extracted is not None and _same(answer_type, extracted, gold))


def score_sample(sample: Sample, output: str, scoring: Scoring) -> Score:
    if scoring == "paper" and sample.answer_type == "number":
        return Score(paper_last_number(output), paper_math_correct(output, sample.reference))
    return score(sample.answer_type, output, sample.gold, sample.choices)
