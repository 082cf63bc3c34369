"""Rule-based extraction on tricky answers, format metrics, the judge's parsing and the
Wilson interval."""

from __future__ import annotations

import pytest

from nudging_eval.judge import QUALITY_ASPECTS, parse_correct, parse_rating
from nudging_eval.report import wilson_interval
from nudging_eval.scoring import (
    answer_part,
    canonical_date,
    choice_letter,
    extract,
    last_letters,
    last_number,
    ran_on,
    score,
)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 72.", "72"),
        ("She pays $1,234.50 in total.", "1234.5"),
        ("Total: 5,000 pens", "5000"),
        ("It is -4 degrees now.", "-4"),
        ("5-3 = 2", "2"),  # a minus between numbers is not a sign
        ("That makes 18.00.", "18"),
        ("3.5kg of flour", "3.5"),
        ("Step 1: 4 + 2 = 6 apples\nSo 6", "6"),
        ("1, 2, 3", "3"),
        ("version2 has 7 parts", "7"),  # digits glued to a word are not a number
        ("no digits at all", None),
        ("1. Dan has 4 stickers.\n2. He gets 8 more: 4 + 8 = 12.\n3. So he has", "12"),  # list items
        ("Steps:\n 1) add\n 2) done: 12\n10. Next", "12"),
        ("The answer is\n12.", "12"),  # a number alone on its line is an answer, not an item
    ],
)
def test_last_number(text: str, number: str | None) -> None:
    assert last_number(text) == number


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("The correct answer is option B because ...", "B"),
        ("A. 0\nB. 2\nC. 1\nD. 3\nThe answer is B", "B"),  # options repeated before the answer
        ("(A) is tempting, but (D) is right.", "D"),
        ("A coin is not a planet, so the answer must be C.", "C"),  # the article "A" is no answer
        ("I would pick B) because it fits.", "B"),
        ("A cat sat on a mat", None),
    ],
)
def test_choice_letter(text: str, letter: str | None) -> None:
    assert choice_letter(text) == letter


def test_choice_letter_with_numeric_labels() -> None:
    assert choice_letter("The answer is 2.", ("1", "2", "3", "4")) == "2"


@pytest.mark.parametrize(
    ("answer_type", "text", "expected"),
    [
        ("yes_no", "Yes, that is plausible.", "yes"),
        ("yes_no", "At first it seems plausible, but it is not plausible.", "no"),
        ("yes_no", "This is implausible because he plays soccer.", "no"),
        ("yes_no", "Is it plausible? Yes", "yes"),
        ("true_false", "So the statement is false.", "false"),
        ("true_false", "Is it true? Yes.", "true"),
        ("coin_flip", "Two flips bring it back, so yes, it is still heads up.", "yes"),
        ("coin_flip", "It was flipped once, so the coin is tails up.", "no"),
        ("coin_flip", "After one flip the coin is not heads up.", "no"),
        ("coin_flip", "The coin started heads up. One flip. No.", "no"),
        ("coin_flip", "No, after one flip it is not still heads up.", "no"),
        ("coin_flip", "Is the coin still heads up? No, it is tails up.", "no"),
        ("coin_flip", "Step 1: Pia does not flip the coin.\nStep 2: Is the coin still heads up?", None),
        ("yes_no", "Is it plausible that he scored? It is implausible.", "no"),
        ("date", "Tomorrow is 12/25/1937.", "12/25/1937"),
        ("date", "From 1/2/2020 we go to 2/3/2020", "02/03/2020"),
    ],
)
def test_word_answers(answer_type: str, text: str, expected: str) -> None:
    assert extract(answer_type, text) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "letters"),
    [
        ('The last letters are y, a, j and o. So the answer is "yajo".', "yajo"),
        ("Concatenating them gives NK", "nk"),
        ("The answer is: yajc.", "yajc"),
    ],
)
def test_last_letters(text: str, letters: str) -> None:
    assert last_letters(text) == letters


def test_canonical_date_pads() -> None:
    assert canonical_date("5/1/2021") == "05/01/2021"


def test_answer_is_read_before_the_model_runs_on() -> None:
    output = "4 + 3 = 7 apples.\nQuestion: Tom has 9 pears. How many does he have?\nAnswer: 9"
    assert answer_part(output) == "4 + 3 = 7 apples."
    assert score("number", output, "7").correct
    assert ran_on(output)
    assert ran_on("Question: 2000")  # it started with a new question at once
    assert not score("number", "Question: 2000", "2000").correct
    assert ran_on("Sure.<|im_start|>user\nmore")
    assert not ran_on("The question is: how many? Seven. The Q: score is high.")


def test_score_compares_numbers_by_value_and_words_without_case() -> None:
    assert score("number", "It costs $5,000.00", "5000") == score("number", "5000", "5,000")
    assert score("number", "It costs 5000.5", "5000").correct is False
    assert score("last_letters", 'So "YAJO".', "yajo").correct
    assert score("choice", "The answer is (2)", "2", ("1", "2", "3", "4")).correct
    assert score("judged", "anything", "").correct is None


def test_judge_replies_are_parsed() -> None:
    assert parse_correct('```json\n{"reason": "same", "correct": 1}\n```') is True
    assert parse_correct('{"reason": "no", "correct": "0"}') is False
    assert parse_correct("'correct': 1 with broken JSON {") is True
    assert parse_correct("I cannot decide") is None
    scores = {aspect: {"reason": "ok", "score": 4} for aspect in QUALITY_ASPECTS}
    scores["depth"] = {"reason": "bad", "score": "[score]"}  # unreadable: counts 1, as the paper counts it
    assert parse_rating(str(scores).replace("'", '"'), QUALITY_ASPECTS) == pytest.approx((4 * 4 + 1) / 5)


def test_wilson_interval() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
