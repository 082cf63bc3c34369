"""The paper's 13 datasets: where they live on the hub, how a row becomes a prompt and a
gold answer, and the paper's sampling of them.

Prompts follow the paper's layout: a system prompt, then the question with its prefix
("Question: " or "Instruction: "), then the answer start ("" for every dataset). Rows are
read with `datasets.load_dataset(hub_id, config, split=...)`, or from a local JSONL file of
rows in the same schema (`--data`); `load_rows` is the one place rows come from.

Splits are the ones the paper's command line used: its `run_api.py` passes `--split`
(default `test`, which its README's commands keep) to every loader, overriding the loaders'
own defaults. Where `test` cannot have been what ran, each spec says why it differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

AnswerType = Literal[
    "number", "choice", "yes_no", "true_false", "coin_flip", "last_letters", "date", "judged"
]
Row = Mapping[str, Any]

RANDOM_SEED = 609  # the paper's
SYSTEM_REASONING = "Answer the question by walking through the reasoning steps."
SYSTEM_INSTRUCT = "You are a helpful assistant."


@dataclass(frozen=True, slots=True)
class Layout:
    """The paper's prompt pieces; its answer start is "" for every dataset, so the model
    config's own `answer_start` is the one that applies."""

    system: str
    question_prefix: str


REASONING = Layout(SYSTEM_REASONING, "Question: ")
INSTRUCTION = Layout(SYSTEM_INSTRUCT, "Instruction: ")


@dataclass(frozen=True, slots=True)
class Sample:
    id: str
    question: str  # the question alone, as the dataset gives it
    gold: str  # the normalised answer rule-based scoring compares with ("" when judged)
    reference: str  # the gold answer as the paper shows it to its judge
    answer_type: AnswerType
    layout: Layout = REASONING
    context: str = ""  # text before the question prefix (MMLU's subject line)
    choices: tuple[str, ...] = ()  # the labels of a multiple-choice question

    def user_text(self) -> str:
        return f"{self.context}{self.layout.question_prefix}{self.question}"

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.layout.system},
            {"role": "user", "content": self.user_text()},
        ]


@dataclass(frozen=True, slots=True)
class Converted:
    question: str
    gold: str
    reference: str
    context: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DatasetSpec:
    name: str
    hub_id: str
    config: str | None
    split: str
    answer_type: AnswerType
    convert: Callable[[Row], Converted]
    layout: Layout = REASONING


def _number_text(value: Any) -> str:
    """A numeric gold answer in one canonical spelling: "72", "3.5", "-4"."""
    number = float(str(value).replace(",", "").strip())
    return str(int(number)) if number.is_integer() else repr(number)


def _gsm8k(row: Row) -> Converted:
    answer = str(row["answer"])
    return Converted(str(row["question"]).strip(), _number_text(answer.split("####")[-1]), answer)


def _svamp(row: Row) -> Converted:
    return Converted(
        str(row["question_concat"]).strip(),
        _number_text(row["Answer"]),
        f"{row['Equation']} = {row['Answer']}",
    )


def _multiarith(row: Row) -> Converted:
    return Converted(str(row["question"]).strip(), _number_text(row["final_ans"]), str(row["final_ans"]))


def _labelled_choices(question: str, labels: Sequence[str], texts: Sequence[str], answer: str) -> Converted:
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts, strict=True))
    reference = f"{answer}. {texts[list(labels).index(answer)]}"
    return Converted(f"{question}\n{options}", answer, reference, choices=tuple(labels))


def _mmlu(row: Row) -> Converted:
    texts = list(row["choices"])
    labels = [chr(ord("A") + i) for i in range(len(texts))]
    converted = _labelled_choices(str(row["question"]), labels, texts, labels[int(row["answer"])])
    return Converted(
        converted.question,
        converted.gold,
        converted.reference,
        context=f"Subject: {row['subject']}\n",
        choices=converted.choices,
    )


def _hub_choices(row: Row) -> Converted:
    """ARC and CommonsenseQA: `choices: {label: [...], text: [...]}` and `answerKey`."""
    choices = row["choices"]
    return _labelled_choices(
        str(row["question"]), list(choices["label"]), list(choices["text"]), str(row["answerKey"])
    )


def _strategyqa(row: Row) -> Converted:
    gold = "true" if row["answer"] else "false"
    return Converted(str(row["question"]).strip(), gold, gold)


def _sports(row: Row) -> Converted:
    plausible = row["targets"][0] == "plausible"
    question = str(row["inputs"]).split("Plausible/implausible?")[0].strip()
    return Converted(
        question,
        "yes" if plausible else "no",
        "1. yes\n2. plausible" if plausible else "1. no\n2. implausible",
    )


def _date(row: Row) -> Converted:
    question = str(row["inputs"]).split("Q:")[1].split("A:")[0].strip()
    target = str(row["targets"][0])
    return Converted(question, target, target)


def _coin_flip(row: Row) -> Converted:
    target = str(row["targets"]).strip().lower()
    return Converted(str(row["inputs"]).split("Q:")[1].strip(), target, target)


def _last_letters(row: Row) -> Converted:
    answer = str(row["answer"]).strip()
    return Converted(str(row["question"]).strip(), answer.lower(), answer)


def _justeval(row: Row) -> Converted:
    return Converted(str(row["input"]).strip(), "", str(row.get("output_cand") or ""))


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("gsm8k", "gsm8k", "main", "test", "number", _gsm8k),
        DatasetSpec("svamp", "ChilleD/SVAMP", None, "test", "number", _svamp),
        DatasetSpec("multiarith", "ChilleD/MultiArith", None, "test", "number", _multiarith),
        DatasetSpec("mmlu", "cais/mmlu", "all", "test", "choice", _mmlu),
        DatasetSpec("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", "choice", _hub_choices),
        DatasetSpec("strategyqa", "ChilleD/StrategyQA", None, "test", "true_false", _strategyqa),
        # Its test split has no answer keys, on which the paper's loader fails: the paper's
        # figures can only come from its loader's own default.
        DatasetSpec("csqa", "tau/commonsense_qa", None, "validation", "choice", _hub_choices),
        # BIG-bench tasks have no test split ("default", "train", "validation"): as for csqa.
        DatasetSpec(
            "sports", "hails/bigbench", "sports_understanding_zero_shot", "default", "yes_no", _sports
        ),
        DatasetSpec("date", "hails/bigbench", "date_understanding_zero_shot", "default", "date", _date),
        DatasetSpec("coin_flip", "skrishna/coin_flip", None, "test", "coin_flip", _coin_flip),
        DatasetSpec(
            "last_letter_concat", "ChilleD/LastLetterConcat", None, "test", "last_letters", _last_letters
        ),
        # The paper's just-eval loader takes no split: always this one.
        DatasetSpec(
            "justeval",
            "re-align/just-eval-instruct",
            "judgements_main",
            "gpt_3.5_turbo_0301",
            "judged",
            _justeval,
            INSTRUCTION,
        ),
        DatasetSpec(
            "justeval_safe",
            "re-align/just-eval-instruct",
            "judgements_safety",
            "gpt_3.5_turbo_0301",
            "judged",
            _justeval,
            INSTRUCTION,
        ),
    )
}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error})") from None
    return rows


def load_rows(
    spec: DatasetSpec, split: str | None = None, data_file: str | Path | None = None
) -> Sequence[Row]:
    """The dataset's rows: from a local JSONL file in the hub's schema, else from the hub."""
    if data_file is not None:
        return read_jsonl(data_file)
    import datasets  # heavy: only when the hub is asked

    try:
        rows: Sequence[Row] = datasets.load_dataset(spec.hub_id, spec.config, split=split or spec.split)
    except Exception as error:  # no network, no such split, ...: one message, not a traceback
        raise ValueError(
            f"cannot load {spec.hub_id} ({spec.config or 'default'}) from the hub: {error}; "
            "give its rows with --data FILE.jsonl"
        ) from None
    return rows


def sample_indices(total: int, count: int | None) -> list[int]:
    """The paper's sample: numpy's legacy generator seeded with 609, then `choice` without
    replacement; every row, in order, when `count` is None or not smaller than `total`."""
    if count is None or count >= total:
        return list(range(total))
    import numpy as np  # the eval extra; not needed to build the CLI

    np.random.seed(RANDOM_SEED)
    return [int(i) for i in np.random.choice(total, count, replace=False)]


def load_samples(
    name: str,
    split: str | None = None,
    count: int | None = None,
    rows: Sequence[Row] | None = None,
    data_file: str | Path | None = None,
) -> list[Sample]:
    """Samples of one of the paper's datasets (`rows` given: those rows instead of the hub's)."""
    spec = DATASETS[name]
    source = rows if rows is not None else load_rows(spec, split, data_file)
    samples = []
    for index in sample_indices(len(source), count):
        try:
            converted = spec.convert(source[index])
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise ValueError(f"{name} row {index} does not have the hub's schema: {error!r}") from None
        samples.append(
            Sample(
                id=f"{name}-{index}",
                question=converted.question,
                gold=converted.gold,
                reference=converted.reference,
                answer_type=spec.answer_type,
                layout=spec.layout,
                context=converted.context,
                choices=converted.choices,
            )
        )
    return samples
