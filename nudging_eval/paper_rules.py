"""The paper's own scoring rules, as its code (`dataset_utils.py`) applies them, for
`--scoring paper` and the paper's nudging-word ratio.

- Math sets (gsm8k, svamp, multiarith): the last number of the *whole* output, by the pattern
  `\\d+(?:,\\d{3})*(?:\\.\\d*)?` (no sign, no currency; digits inside words count; a run-on into
  the next question counts too), equal as a string to the last number of the gold answer text
  after the same normalisation. The paper judged every other set with an LLM.
- The nudging-word ratio: per answer, the words of every round's nudging words but the last
  round's (the nudger's own ending) over the words of the answer before clean-up, both counted
  by `split(" ")`, at most 1.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PAPER_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d*)?")


def paper_number(matched: str) -> str:
    """A match of the paper's pattern as the paper normalises it: commas removed, one trailing
    dot dropped, written as an integer when whole ("1,234." -> "1234", "2.50" -> "2.5")."""
    number = float(matched.replace(",", "").removesuffix("."))
    return str(int(number)) if number.is_integer() else str(number)


def paper_last_number(text: str) -> str | None:
    found = PAPER_NUMBER.findall(text)
    return paper_number(found[-1]) if found else None


def paper_math_correct(output: str, gold_text: str) -> bool:
    """The paper's math rule; `gold_text` is the gold answer as the paper kept it (GSM8K's
    whole worked solution, SVAMP's "equation = answer")."""
    extracted = paper_last_number(output)
    return extracted is not None and extracted == paper_last_number(gold_text)


def _space_words(text: str) -> int:
    # `split(" ")`, as the paper counts: "" is one word, and so is each gap of a double space.
    return len(text.split(" "))


def paper_nudging_word_ratio(raw_output: str, round_nudging_words: Sequence[str]) -> float:
    """The paper's ratio for one answer; `round_nudging_words` holds each round's nudging
    words in order (the paper's `all_nudging_words`), `raw_output` the answer before clean-up.
    Reproduced with its quirk: no counted nudging words still count as one word."""
    kept = [words.strip() for words in round_nudging_words if words.strip()]
    return min(1.0, _space_words(" ".join(kept[:-1])) / _space_words(raw_output))
