"""Dataset loaders on fixture rows in each hub dataset's own schema, the paper's sampling, and
the generated synthetic tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from nudging_eval.datasets import (
    DATASETS,
    SYSTEM_INSTRUCT,
    SYSTEM_REASONING,
    load_rows,
    load_samples,
    read_jsonl,
)
from nudging_eval.synthetic import SYNTHETIC, generate

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.jsonl"


def test_every_dataset_has_fixture_rows_that_load() -> None:
    assert len(DATASETS) == 13
    for name in DATASETS:
        samples = load_samples(name, data_file=fixture(name))
        assert len(samples) == len(read_jsonl(fixture(name))) >= 2, name
        for sample in samples:
            assert sample.question and sample.answer_type == DATASETS[name].answer_type
            assert sample.gold or sample.answer_type == "judged"


def test_math_golds_are_canonical_numbers() -> None:
    assert [s.gold for s in load_samples("gsm8k", data_file=fixture("gsm8k"))] == ["72", "5000", "-4"]
    svamp = load_samples("svamp", data_file=fixture("svamp"))
    assert [s.gold for s in svamp] == ["51", "3.5"]  # the hub's float and a string alike
    assert svamp[0].reference == "( 76.0 - 25.0 ) = 51.0"
    assert [s.gold for s in load_samples("multiarith", data_file=fixture("multiarith"))] == ["39", "8"]
    first = load_samples("multiarith", data_file=fixture("multiarith"))[0]
    assert first.question.startswith("For Halloween")  # stripped, as the paper strips it


def test_multiple_choice_layout() -> None:
    mmlu = load_samples("mmlu", data_file=fixture("mmlu"))[0]
    assert mmlu.context == "Subject: abstract_algebra\n"
    assert mmlu.question.endswith("over Q.\nA. 0\nB. 2\nC. 1\nD. 3")
    assert (mmlu.gold, mmlu.reference, mmlu.choices) == ("B", "B. 2", ("A", "B", "C", "D"))
    assert mmlu.user_text() == "Subject: abstract_algebra\nQuestion: " + mmlu.question
    arc = load_samples("arc_challenge", data_file=fixture("arc_challenge"))
    assert (arc[0].gold, arc[0].reference) == ("C", "C. Planetary days will become shorter.")
    assert arc[1].choices == ("1", "2", "3", "4") and arc[1].gold == "2"  # ARC's numeric labels
    csqa = load_samples("csqa", data_file=fixture("csqa"))[0]
    assert csqa.question.endswith("\nA. bank\nB. library\nC. department store\nD. mall\nE. new york")


def test_bigbench_and_reasoning_rows() -> None:
    sports = load_samples("sports", data_file=fixture("sports"))
    assert sports[0].question.endswith("screen pass in the NFC championship.")
    assert "Plausible/implausible" not in sports[0].question
    assert [(s.gold, s.reference) for s in sports] == [
        ("no", "1. no\n2. implausible"),
        ("yes", "1. yes\n2. plausible"),
    ]
    date = load_samples("date", data_file=fixture("date"))
    assert (
        date[0].question.startswith("Today is Christmas Eve of 1937.")
        and "choice: 12/25/1937" in date[0].question
    )
    assert not date[0].question.endswith("A:") and date[0].gold == "12/25/1937"
    coins = load_samples("coin_flip", data_file=fixture("coin_flip"))
    assert coins[0].question.startswith("A coin is heads up.") and [c.gold for c in coins] == ["no", "yes"]
    assert [s.gold for s in load_samples("strategyqa", data_file=fixture("strategyqa"))] == ["true", "false"]
    letters = load_samples("last_letter_concat", data_file=fixture("last_letter_concat"))
    assert [s.gold for s in letters] == ["yajo", "yajc"]


def test_prompt_layouts_follow_the_paper() -> None:
    gsm8k = load_samples("gsm8k", data_file=fixture("gsm8k"))[0]
    assert gsm8k.messages() == [
        {"role": "system", "content": SYSTEM_REASONING},
        {"role": "user", "content": "Question: " + gsm8k.question},
    ]
    justeval = load_samples("justeval_safe", data_file=fixture("justeval_safe"))[0]
    assert justeval.messages()[0]["content"] == SYSTEM_INSTRUCT
    assert justeval.user_text().startswith("Instruction: How can I pick a lock")
    assert justeval.gold == "" and justeval.reference.startswith("I can't help")


def test_sampling_is_the_papers() -> None:
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(40)]
    np.random.seed(609)
    expected = np.random.choice(40, 7, replace=False)
    samples = load_samples("gsm8k", count=7, rows=rows)
    assert [s.id for s in samples] == [f"gsm8k-{i}" for i in expected]
    assert [s.gold for s in samples] == [str(i) for i in expected]
    assert [s.gold for s in load_samples("gsm8k", count=40, rows=rows)] == [str(i) for i in range(40)]


def test_the_hub_is_asked_for_the_papers_dataset_and_split(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
        asked.append((path, name, split))
        return read_jsonl(fixture("arc_challenge"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert len(load_rows(DATASETS["arc_challenge"])) == 2
    load_rows(DATASETS["gsm8k"], split="train")
    assert asked == [("allenai/ai2_arc", "ARC-Challenge", "test"), ("gsm8k", "main", "train")]


def test_splits_are_the_papers_command_lines() -> None:
    # run_api.py's --split defaults to "test" and overrides every loader's own default, except
    # where that split has no labels or does not exist (csqa, BIG-bench) or is not asked for.
    not_test = {"csqa": "validation", "sports": "default", "date": "default",
                "justeval": "gpt_3.5_turbo_0301", "justeval_safe": "gpt_3.5_turbo_0301"}
    assert {name: spec.split for name, spec in DATASETS.items()} == {
        name: not_test.get(name, "test") for name in DATASETS
    }


def test_rows_in_another_schema_are_refused_by_name(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "no question field"}\n')
    with pytest.raises(ValueError, match="gsm8k row 0 does not have the hub's schema"):
        load_samples("gsm8k", data_file=data)


def test_synthetic_tasks_are_seeded_and_scale_with_difficulty() -> None:
    for name in SYNTHETIC:
        first, again = generate(name, 20, difficulty=3, seed=1), generate(name, 20, difficulty=3, seed=1)
        assert first == again
        assert [s.question for s in generate(name, 20, difficulty=3, seed=2)] != [s.question for s in first]
    easy, hard = generate("synthetic_arithmetic", 1, 1)[0], generate("synthetic_arithmetic", 1, 4)[0]
    assert easy.question.count(" gives ") == 1 and hard.question.count(" gives ") == 4
    assert len(generate("synthetic_last_letters", 1, 5)[0].gold) == 5
    assert generate("synthetic_coin_flip", 1, 6)[0].question.count("the coin.") == 6


def test_synthetic_answers_are_right() -> None:
    for sample in generate("synthetic_coin_flip", 30, difficulty=3):
        flips = sample.question.count(" flips the coin.")
        assert sample.gold == ("yes" if flips % 2 == 0 else "no")
    for sample in generate("synthetic_last_letters", 30, difficulty=3):
        phrase = sample.question.split('"')[1]
        assert sample.gold == "".join(word[-1] for word in phrase.lower().split())
    for sample in generate("synthetic_arithmetic", 30, difficulty=3):
        sentences = sample.question.split(". ")
        total = int(sentences[0].split()[2])
        for sentence in sentences[1:-1]:
            amount = int(next(word for word in sentence.split() if word.isdigit()))
            total += -amount if " to " in sentence else amount
        assert sample.gold == str(total)


def test_an_unreachable_hub_says_how_to_load_rows_locally(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'gsm8k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"cannot load gsm8k \(main\) from the hub.*--data FILE.jsonl"):
        load_rows(DATASETS["gsm8k"])
