"""`nudging-proxy eval` run as the paper ran it: `--strategy`, `--cleanup` (on by default for
nudging), `--scoring paper` and the paper's nudging-word ratio, against a scripted chat
endpoint that answers with text and provenance the tests choose, and on the simulators."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi import FastAPI, Request

from nudging_core.nudging.rules import clean_repetitions
from nudging_eval.cli import add_arguments, evaluate, main
from nudging_eval.paper_rules import paper_nudging_word_ratio
from nudging_eval.runner import read_records
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

# An answer with provenance: (text, source) spans.
Answer = list[tuple[str, str]]
# Stripped, the answer is one sentence twice over: a repeat the paper's clean-up finds.
SENTENCE = "The answer is 7 because 4 + 3 = 7."
NUDGED_ANSWER: Answer = [
    ("  The answer is 7", "nudging"), (" because 4 + 3 = 7.", "base"),
    ("The answer is 7", "nudging"), (" because 4 + 3 = 7.", "base"),
]


def endpoint_app(answer_for: Callable[[str], Answer], asked: list[dict[str, Any]]) -> FastAPI:
    """An OpenAI chat endpoint that answers each question with `answer_for(question)` and our
    provenance extension; request bodies go to `asked`."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict[str, Any]:
        body = await request.json()
        asked.append(body)
        spans = answer_for(body["messages"][-1]["content"])
        report = {
            "spans": [{"text": text, "source": source} for text, source in spans],
            "rounds": len(spans),
            "upstream_requests": {"base": 2, "nudging": 3},
            "stop_reason": "nudging_model_stop",
        }
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(t for t, _ in spans)},
                  "finish_reason": "stop", "nudging": report}
        return {"choices": [choice], "usage": {"completion_tokens": 9}}

    return app


def run(*argv: str) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [summary] = asyncio.run(evaluate(parser.parse_args([*argv, "--no-progress"])))
    return summary


def records(out: Path) -> list[dict[str, Any]]:
    [path] = out.glob("*.jsonl")
    return read_records(path)


@pytest.fixture
def endpoint() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    asked: list[dict[str, Any]] = []
    with running(endpoint_app(lambda _question: NUDGED_ANSWER, asked)) as url:
        yield url + "/v1", asked


def synthetic(url: str, exp: str, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "synthetic_arithmetic", "--exp", exp, "--endpoint", url, "--model", "m",
            "--num-samples", "2", "--out", str(out), *extra]


def test_nudged_answers_are_cleaned_by_default_and_counted_before(
    endpoint: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, asked = endpoint
    summary = run(*synthetic(url, "nudging", tmp_path))
    raw = "".join(text for text, _ in NUDGED_ANSWER)
    for record in records(tmp_path):
        assert record["raw_output"] == raw
        assert record["output"] == clean_repetitions(raw) == SENTENCE
        assert record["spans"] == [  # cut like the text
            {"text": "The answer is 7", "source": "nudging"},
            {"text": " because 4 + 3 = 7.", "source": "base"},
        ]
        assert record["nudging_word_ratio"] == pytest.approx(4 / 10)  # ours: of the cleaned answer
        # The paper's: before clean-up, without the last round's nudging words.
        assert record["paper_nudging_word_ratio"] == pytest.approx(
            paper_nudging_word_ratio(raw, [text for text, source in NUDGED_ANSWER if source == "nudging"])
        )
        assert record["paper_nudging_word_ratio"] == pytest.approx(4 / len(raw.split(" ")))
    assert summary["cleanup"] is True
    assert summary["paper_nudging_word_ratio"] == pytest.approx(4 / len(raw.split(" ")))
    # The proxy is asked not to clean: the runner does, after counting.
    assert all(body["nudging"]["cleanup"] is False for body in asked)


def test_no_cleanup_keeps_the_answer_and_other_experiments_are_not_cleaned(
    endpoint: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, _ = endpoint
    raw = "".join(text for text, _ in NUDGED_ANSWER)
    run(*synthetic(url, "nudging", tmp_path / "kept", "--no-cleanup"))
    run(*synthetic(url, "base_only", tmp_path / "base"))
    run(*synthetic(url, "base_only", tmp_path / "asked", "--cleanup"))
    assert {r["output"] for r in records(tmp_path / "kept")} == {raw}
    assert {r["output"] for r in records(tmp_path / "base")} == {raw}
    assert {r["paper_nudging_word_ratio"] for r in records(tmp_path / "base")} == {None}  # nudging runs only
    assert {r["output"] for r in records(tmp_path / "asked")} == {clean_repetitions(raw)}


def test_the_strategy_is_asked_for_and_kept_apart(
    endpoint: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    url, asked = endpoint
    for strategy in ("paper", "fast"):
        summary = run(*synthetic(url, "nudging", tmp_path, "--strategy", strategy))
        assert summary["strategy"] == strategy
    assert [body["nudging"]["strategy"] for body in asked] == ["paper"] * 2 + ["fast"] * 2
    assert len(list(tmp_path.glob("*-paper.jsonl"))) == len(list(tmp_path.glob("*-fast.jsonl"))) == 1
    run(*synthetic(url, "nudging", tmp_path / "default"))
    assert "strategy" not in asked[-1]["nudging"]  # the model's configured strategy
    with pytest.raises(SystemExit, match="--strategy needs --exp nudging"):
        main(synthetic(url, "ensemble", tmp_path, "--strategy", "paper"))


GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A pen costs $1,200.50 and a cap $1. Total?", "answer": "#### 1,201.50"},
    {"question": "It is 5 degrees and drops 9. How cold?", "answer": "5 - 9 = -4\n#### -4"},
]
ANSWERS = {
    "Tom": "So 3 + 4 = 7 apples.\n\nQuestion: Ann has 2 pears and eats 1. How many?",  # a run-on
    "pen": "The total is $1,201.50.",
    "cold": "It is -4 degrees.",
}


def math_answer(question: str) -> Answer:
    return [(next(a for key, a in ANSWERS.items() if key in question), "base")]


def test_scoring_paper_applies_the_papers_math_rule(tmp_path: Path) -> None:
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS))
    asked: list[dict[str, Any]] = []
    with running(endpoint_app(math_answer, asked)) as url:
        argv = ["--dataset", "gsm8k", "--data", str(data), "--exp", "base_only", "--endpoint", url + "/v1",
                "--model", "m", "--out", str(tmp_path / "runs")]
        run(*argv)
        ours = {r["id"]: r for r in records(tmp_path / "runs")}
        summary = run(*argv, "--scoring", "paper")  # resumed: scored again, nothing generated
    assert len(asked) == len(GSM8K_ROWS)
    paper = {r["id"]: r for r in records(tmp_path / "runs")}
    # Ours stops at the run-on and keeps the sign; the paper's reads the whole output and
    # drops signs on both sides.
    assert [(ours[i]["extracted"], ours[i]["correct"]) for i in sorted(ours)] == [
        ("7", True), ("1201.5", True), ("-4", True)]
    assert [(paper[i]["extracted"], paper[i]["correct"]) for i in sorted(paper)] == [
        ("1", False), ("1201.5", True), ("4", True)]
    assert {r["scoring"] for r in paper.values()} == {"paper"}
    assert summary["scoring"] == "paper" and summary["correct"] == 2
    rescored = run(*argv, "--rescore")
    assert rescored["scoring"] == "ours" and rescored["correct"] == 3


@pytest.fixture(scope="module")
def simulated_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running(create_simulator("base", time_scale=0)) as base, running(
        create_simulator("aligned", time_scale=0)
    ) as aligned:
        config = tmp_path_factory.mktemp("sim") / "sim.yaml"
        config.write_text(yaml.safe_dump({"models": [{
            "name": "nudged", "method": "nudging", "base": {"url": base + "/v1", "model": "base"},
            "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"},
        }]}))
        yield config


def test_paper_and_fast_in_process_count_the_papers_ratio_per_round(
    simulated_config: Path, tmp_path: Path
) -> None:
    common = ["--dataset", "synthetic_coin_flip", "--exp", "nudging", "--config", str(simulated_config),
              "--num-samples", "3", "--max-tokens", "60", "--out", str(tmp_path)]
    for strategy in ("paper", "fast"):
        summary = run(*common, "--strategy", strategy)
        assert summary["strategy"] == strategy and summary["cleanup"] is True
        for record in read_records(next(tmp_path.glob(f"*-{strategy}.jsonl"))):
            # In-process every nudging piece is one round's words.
            rounds = record["nudging_words"]
            assert len(rounds) <= record["rounds"]
            assert record["paper_nudging_word_ratio"] == pytest.approx(
                paper_nudging_word_ratio(record["raw_output"], rounds)
            )
        assert summary["paper_nudging_word_ratio"] is not None
