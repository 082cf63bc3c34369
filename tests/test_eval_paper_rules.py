"""`--scoring paper` and the paper's nudging-word ratio against the seed's own functions
(`dataset_utils.parse_pred_ans_math_problems` and `get_num_nudging_words_and_ratio`, run
offline from the fetched mirror), plus the values read off the seed's rule by hand."""

from __future__ import annotations

import json
from types import ModuleType

import pytest

from nudging_eval.datasets import load_samples
from nudging_eval.paper_rules import paper_last_number, paper_math_correct, paper_nudging_word_ratio
from nudging_eval.scoring import score_sample

from .seed_code import seed_module

# (output, its last number by the seed's rule, read off its pattern and `convert_number`).
TRICKY_OUTPUTS = [
    ("The answer is 18.", "18"),
    # A run-on into the next question: the seed reads the whole output, so its numbers count.
    ("So he has 18 apples.\n\nQuestion: Tom has 3 apples and buys 5 more. How many?", "5"),
    ("Step 1: 4 + 8 = 12 stickers.\nStep 2: 12 / 2 = 6 each, for 2 friends", "2"),
    ("The total is $1,234,567 dollars.", "1234567"),
    ("She pays $1,000.50 in all.", "1000.5"),
    ("That is 1,23 of them", "23"),  # not a thousands group: two numbers
    ("Exactly 1,2345", "5"),  # "1,234" then "5"
    ("It costs 2.50.", "2.5"),
    ("That makes 18.00.", "18"),
    ("So 5.", "5"),  # the trailing dot dropped
    ("pi is 3.14.15", "15"),
    ("It is -4 degrees now.", "4"),  # no sign in the pattern
    ("5-3 = 2", "2"),
    ("version2 of it", "2"),  # digits inside a word count
    ("Agent 007 reports", "7"),
    ("Only .5 left", "5"),
    ("10,000.5 grams", "10000.5"),
    ("no digits at all", None),
]
GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
)


@pytest.fixture(scope="module")
def seed_dataset_utils(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return seed_module("dataset_utils", tmp_path_factory.mktemp("seed"))


def seed_math_labels(seed: ModuleType, outputs: list[str], golds: list[str]) -> list[bool]:
    parsed = seed.parse_pred_ans_math_problems(
        questions=outputs, ans_pred=outputs, ans_gold=golds,
        scores=[json.dumps({"correct": -1})] * len(outputs), nudging_words=[],
    )
    return [label == 1 for label in parsed["ans_scores_rule"]]


@pytest.mark.parametrize(("output", "number"), TRICKY_OUTPUTS)
def test_the_last_number_by_the_seeds_rule(output: str, number: str | None) -> None:
    assert paper_last_number(output) == number


def test_the_math_rule_decides_as_the_seeds_function(seed_dataset_utils: ModuleType) -> None:
    outputs, golds = [], []
    for output, number in TRICKY_OUTPUTS:
        # Its own last number (right unless there is none), a near miss, a negative gold
        # (the seed drops the sign on both sides) and GSM8K's worked solution.
        for gold in (f"#### {number or 0}", f"#### {number}1", "#### -4", GSM8K_GOLD, "8 - 3 = 5.0"):
            outputs.append(output)
            golds.append(gold)
    ours = [paper_math_correct(output, gold) for output, gold in zip(outputs, golds, strict=True)]
    assert ours == seed_math_labels(seed_dataset_utils, outputs, golds)
    assert sum(ours) >= len(TRICKY_OUTPUTS)  # the grid holds both verdicts


def test_scoring_paper_reads_the_whole_output_and_the_gold_solution() -> None:
    [sample] = load_samples("gsm8k", rows=[{"question": "How many clips?", "answer": GSM8K_GOLD}])
    run_on = "She sold 72 clips.\nQuestion: Tom has 3 apples."
    paper = score_sample(sample, run_on, "paper")
    assert (paper.extracted, paper.correct) == ("3", False)  # the run-on's number, as the paper read it
    ours = score_sample(sample, run_on, "ours")
    assert (ours.extracted, ours.correct) == ("72", True)
    assert score_sample(sample, "So 72.", "paper").correct


# (each round's nudging words, the answer before clean-up)
RATIO_CASES = [
    ([" The answer", " is", " 5."], " The answer is 5."),
    ([" First,", " we add", " the numbers"], " First, we add 3 and 4 to get the numbers"),
    ([], "All base text here"),
    ([" Only the ending."], " Only the ending."),
    (["  ", "\nSure", " thing", "!"], "\nSure thing and more!"),
    ([" a  b", " c"], " a  b and  c"),  # double spaces count twice, as split(" ") does
    ([" long nudged words that", " outnumber"], " short"),
]


@pytest.mark.parametrize(("rounds", "raw"), RATIO_CASES)
def test_the_nudging_word_ratio_is_the_seeds(
    seed_dataset_utils: ModuleType, rounds: list[str], raw: str
) -> None:
    _, seed_ratio = seed_dataset_utils.get_num_nudging_words_and_ratio([raw], [rounds])
    assert paper_nudging_word_ratio(raw, rounds) == pytest.approx(float(seed_ratio))


def test_the_nudging_word_ratio_leaves_out_the_last_round() -> None:
    # "The answer": 2 of the 5 pieces split(" ") gives (the leading space makes an empty one);
    # the last round's " is 5." is the nudger's own ending.
    assert paper_nudging_word_ratio(" The answer is 5.", [" The answer", " is 5."]) == pytest.approx(2 / 5)
