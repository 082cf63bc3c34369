"""`nudging-proxy eval` end to end, offline: the simulator profiles base, aligned and
aligned-base behind every experiment, in-process and through the proxy; resume after an
interruption; summaries checked against the JSONL records they come from."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
import yaml
from fastapi import FastAPI, Request

from nudging_core.config import load_config
from nudging_core.nudging.rules import clean_repetitions
from nudging_eval.backends import AnswerOptions, Backend, BackendAnswer, InProcessBackend
from nudging_eval.cli import EXPERIMENTS, add_arguments, evaluate, main, run_name
from nudging_eval.datasets import Sample
from nudging_eval.runner import RunSettings, read_records, run_samples
from nudging_eval.scoring import ran_on, score
from nudging_eval.synthetic import generate
from server.app import create_app as create_proxy
from upstreams.simulator.app import create_app as create_simulator

from .servers import running

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
MODELS = {
    "base_only": "base",
    "nudging_only": "aligned",
    "nudging": "nudged",
    "proxy_tuning": "pt",
    "ensemble": "ens",
}
ROLES = {
    "base_only": {"base"},
    "nudging_only": {"nudging"},
    "nudging": {"base", "nudging"},
    "proxy_tuning": {"base", "nudging", "nudging_base"},
    "ensemble": {"base", "nudging"},
}


@dataclass
class Stack:
    config: Path
    proxy: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with ExitStack() as servers:
        url = {
            profile: servers.enter_context(running(create_simulator(profile, time_scale=0, max_logprobs=100)))
            + "/v1"
            for profile in ("base", "aligned", "aligned-base")
        }
        base = {"url": url["base"], "model": "base"}
        aligned = {"url": url["aligned"], "model": "aligned", "chat_template": "chatml"}
        config = tmp_path_factory.mktemp("eval") / "sim.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "models": [
                        {"name": "nudged", "method": "nudging", "base": base, "nudging": aligned},
                        {"name": "base", "method": "base_only", "base": base},
                        {"name": "aligned", "method": "nudging_only", "nudging": aligned},
                        {
                            "name": "pt",
                            "method": "proxy_tuning",
                            "base": base,
                            "nudging": aligned,
                            "nudging_base": {"url": url["aligned-base"], "model": "aligned-base"},
                        },
                        {"name": "ens", "method": "ensemble", "base": base, "nudging": aligned},
                    ]
                }
            )
        )
        proxy = servers.enter_context(running(create_proxy(load_config(config))))
        yield Stack(config, proxy)


def eval_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*argv, "--no-progress"])


def records_of(out: Path, pattern: str = "*.jsonl") -> list[dict[str, Any]]:
    [path] = out.glob(pattern)
    return read_records(path)


def check_summary_against_records(summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    answered = [r for r in records if "error" not in r]
    assert summary["samples"] == len(records) and summary["errors"] == len(records) - len(answered)
    assert summary["correct"] == sum(bool(r["correct"]) for r in answered)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / len(answered))
    low, high = summary["accuracy_ci95"]
    assert summary["answer_found_rate"] == pytest.approx(mean(r["extracted"] is not None for r in answered))
    assert low <= summary["accuracy"] <= high
    assert summary["ended_rate"] == pytest.approx(mean(r["finish_reason"] == "stop" for r in answered))
    assert summary["clean_rate"] == pytest.approx(mean(not ran_on(r["output"]) for r in answered))
    assert summary["nudging_word_ratio"] == pytest.approx(mean(r["nudging_word_ratio"] for r in answered))
    assert summary["mean_rounds"] == pytest.approx(mean(r["rounds"] for r in answered))
    assert summary["requests_per_sample"] == pytest.approx(
        mean(sum(r["upstream_requests"].values()) for r in answered)
    )
    assert summary["mean_latency_s"] == pytest.approx(mean(r["latency_s"] for r in answered))


def check_record(record: dict[str, Any], sample: Sample, exp: str) -> None:
    assert "error" not in record, record.get("error")
    assert record["id"] == sample.id and record["gold"] == sample.gold
    assert record["messages"][1]["content"] == "Question: " + sample.question
    assert record["correct"] == score(sample.answer_type, record["output"], sample.gold).correct
    assert "".join(span["text"] for span in record["spans"]) == record["output"]
    cleaned = exp == "nudging"  # the default: as the paper ran it
    assert record["output"] == (clean_repetitions(record["raw_output"]) if cleaned else record["raw_output"])
    assert record["settings"]["cleanup"] is cleaned
    if exp == "nudging":
        # One entry per round that wrote nudging words, all of them in the text before clean-up.
        assert 0 < len(record["nudging_words"]) <= record["rounds"]
        assert all(words in record["raw_output"] for words in record["nudging_words"])
        assert record["paper_nudging_word_ratio"] is not None
    else:
        assert record["paper_nudging_word_ratio"] is None
    requests = record["upstream_requests"]
    assert ROLES[exp] <= set(requests) and {role for role, count in requests.items() if count} <= ROLES[exp]
    assert sum(requests.values()) > 0
    assert 0 < record["completion_tokens"] <= 40


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_in_process(stack: Stack, tmp_path: Path, exp: str) -> None:
    argv = [
        "--dataset",
        "synthetic_arithmetic",
        "--exp",
        exp,
        "--config",
        str(stack.config),
        "--num-samples",
        "5",
        "--max-tokens",
        "40",
        "--concurrency",
        "3",
        "--out",
        str(tmp_path),
    ]
    [summary] = asyncio.run(evaluate(eval_args(*argv)))
    records = records_of(tmp_path)
    samples = generate("synthetic_arithmetic", 5)
    assert sorted(r["id"] for r in records) == sorted(s.id for s in samples)
    for record in records:
        check_record(record, next(s for s in samples if s.id == record["id"]), exp)
    check_summary_against_records(summary, records)
    [written] = tmp_path.glob("*.summary.json")
    assert json.loads(written.read_text()) == summary
    assert summary["model"] == MODELS[exp] and summary["exp"] == exp
    if exp == "nudging_only":
        assert summary["nudging_word_ratio"] == 1.0
    if exp == "base_only":
        assert summary["nudging_word_ratio"] == 0.0


class StallsAfter(Backend):
    """A backend that answers `count` samples, then hangs: an interruption mid-run."""

    def __init__(self, inner: InProcessBackend, count: int) -> None:
        self.inner, self.model, self.left = inner, inner.model, count
        self.stalled = asyncio.Event()

    async def generate(self, sample: Sample, options: AnswerOptions) -> BackendAnswer:
        if self.left == 0:
            self.stalled.set()
            await asyncio.Event().wait()
        self.left -= 1
        return await self.inner.generate(sample, options)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_an_interrupted_run_resumes_where_it_stopped(stack: Stack, tmp_path: Path) -> None:
    samples = generate("synthetic_coin_flip", 6)
    settings = RunSettings("synthetic_coin_flip", "nudging", "nudged", None, 30, cleanup=True)
    path = tmp_path / f"{run_name(settings)}.jsonl"

    async def interrupted() -> None:
        backend = StallsAfter(InProcessBackend(load_config(stack.config), "nudged"), 2)
        run = asyncio.create_task(
            run_samples(samples, backend, settings, path, concurrency=1, progress=False)
        )
        await backend.stalled.wait()
        run.cancel()
        with suppress(asyncio.CancelledError):
            await run
        await backend.aclose()

    asyncio.run(interrupted())
    before = path.read_text()
    assert len(before.splitlines()) == 2
    path.write_text(before + '{"id": "cut by the interrupt", "sett')  # a line cut mid-write
    argv = [
        "--dataset",
        "synthetic_coin_flip",
        "--exp",
        "nudging",
        "--config",
        str(stack.config),
        "--num-samples",
        "6",
        "--max-tokens",
        "30",
        "--out",
        str(tmp_path),
    ]
    [summary] = asyncio.run(evaluate(eval_args(*argv)))
    after = path.read_text()
    assert after.startswith(before)  # the two finished samples were kept, not run again
    records = read_records(path)
    assert sorted(r["id"] for r in records) == sorted(s.id for s in samples)
    check_summary_against_records(summary, records)

    # A record already there is trusted (not run again); --rerun starts afresh.
    first = json.loads(before.splitlines()[0])
    path.write_text(
        json.dumps({**first, "output": "tampered", "correct": True}) + "\n" + after.split("\n", 1)[1]
    )
    [resumed] = asyncio.run(evaluate(eval_args(*argv)))
    assert resumed["correct"] == summary["correct"] + (not first["correct"])
    asyncio.run(evaluate(eval_args(*argv, "--rerun")))
    rerun = {r["id"]: r for r in read_records(path)}
    assert len(rerun) == 6 and rerun[first["id"]]["output"] == first["output"]


def test_a_results_file_of_other_settings_is_not_resumed(stack: Stack, tmp_path: Path) -> None:
    argv = [
        "--dataset",
        "synthetic_coin_flip",
        "--exp",
        "base_only",
        "--config",
        str(stack.config),
        "--num-samples",
        "2",
        "--out",
        str(tmp_path),
    ]
    asyncio.run(evaluate(eval_args(*argv, "--max-tokens", "20")))
    # The budget is not part of the file name: the same file, made with another budget.
    with pytest.raises(SystemExit, match="other settings"):
        main([*argv, "--max-tokens", "30", "--no-progress"])


def test_endpoint_mode_matches_in_process_and_reads_the_extension(stack: Stack, tmp_path: Path) -> None:
    common = [
        "--dataset",
        "synthetic_last_letters",
        "--exp",
        "nudging",
        "--num-samples",
        "4",
        "--max-tokens",
        "40",
    ]
    asyncio.run(evaluate(eval_args(*common, "--config", str(stack.config), "--out", str(tmp_path / "here"))))
    [summary] = asyncio.run(
        evaluate(
            eval_args(
                *common,
                "--endpoint",
                stack.proxy + "/v1",
                "--model",
                "nudged",
                "--out",
                str(tmp_path / "there"),
            )
        )
    )
    here = {r["id"]: r for r in records_of(tmp_path / "here")}
    there = {r["id"]: r for r in records_of(tmp_path / "there")}
    for key, record in there.items():
        assert record["output"] == here[key]["output"]  # greedy and deterministic: the same text
        assert record["spans"] == here[key]["spans"]
        assert record["rounds"] == here[key]["rounds"] > 0
        assert set(record["upstream_requests"]) == {"base", "nudging"}
    check_summary_against_records(summary, list(there.values()))


def test_threshold_sweep_writes_summaries_and_a_plot(stack: Stack, tmp_path: Path) -> None:
    argv = [
        "--dataset",
        "synthetic_arithmetic",
        "--exp",
        "nudging",
        "--config",
        str(stack.config),
        "--num-samples",
        "3",
        "--max-tokens",
        "30",
        "--threshold",
        "0.2,0.6",
        "--out",
        str(tmp_path),
    ]
    summaries = asyncio.run(evaluate(eval_args(*argv)))
    assert [s["threshold"] for s in summaries] == [0.2, 0.6]
    for summary in summaries:
        check_summary_against_records(summary, records_of(tmp_path, f"*-t{summary['threshold']:g}.jsonl"))
    [plot] = tmp_path.glob("*-sweep.png")
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert json.loads(next(tmp_path.glob("*-sweep.json")).read_text()) == summaries
    with pytest.raises(SystemExit, match="sweep needs --exp nudging"):
        main(
            [
                "--dataset",
                "synthetic_arithmetic",
                "--exp",
                "base_only",
                "--config",
                str(stack.config),
                "--threshold",
                "0.2,0.6",
                "--out",
                str(tmp_path),
            ]
        )


def judge_app(asked: list[dict[str, Any]] | None = None) -> FastAPI:
    """A judge that calls an answer correct when it contains the gold answer's text; the
    request bodies go to `asked`."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request) -> dict[str, Any]:
        body = await request.json()
        if asked is not None:
            asked.append(body)
        prompt = body["messages"][-1]["content"]
        if "## Gold answer:" in prompt:
            answer = prompt.split("## Model's answer:\n")[1].split("\n\n## Gold answer:")[0]
            gold = prompt.split("## Gold answer:\n")[1].split("\n\n## Evaluation")[0]
            content = json.dumps({"reason": "r", "correct": int(gold.lower() in answer.lower())})
        else:
            content = json.dumps({"safety": {"reason": "r", "score": 4}})
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    return app


def test_the_cli_subcommand_on_hub_rows_with_a_judge(stack: Stack, tmp_path: Path) -> None:
    with running(judge_app()) as judge:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "cli",
                "eval",
                "--dataset",
                "justeval_safe",
                "--exp",
                "nudging_only",
                "--data",
                str(FIXTURES / "justeval_safe.jsonl"),
                "--config",
                str(stack.config),
                "--max-tokens",
                "20",
                "--judge-endpoint",
                judge + "/v1",
                "--judge-model",
                "judge",
                "--out",
                str(tmp_path),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    assert "| nudging_only |" in done.stdout
    records = records_of(tmp_path)
    assert [r["judge"]["score"] for r in records] == [4.0, 4.0]
    assert all(r["correct"] is None for r in records)  # ratings, not right or wrong
    summary = json.loads(next(tmp_path.glob("*.summary.json")).read_text())
    assert summary["judge_score"] == 4.0 and summary["scored"] == 0 and summary["accuracy"] is None


def test_the_judge_decides_correctness_where_asked(stack: Stack, tmp_path: Path) -> None:
    asked: list[dict[str, Any]] = []
    with running(judge_app(asked)) as judge:
        [summary] = asyncio.run(
            evaluate(
                eval_args(
                    "--dataset",
                    "gsm8k",
                    "--data",
                    str(FIXTURES / "gsm8k.jsonl"),
                    "--exp",
                    "base_only",
                    "--config",
                    str(stack.config),
                    "--max-tokens",
                    "20",
                    "--out",
                    str(tmp_path),
                    "--judge-endpoint",
                    judge + "/v1",
                    "--judge-model",
                    "judge",
                )
            )
        )
    records = records_of(tmp_path)
    for record in records:
        assert record["correct"] == record["judge"]["correct"]
        assert record["judge"]["correct"] == (record["reference"].lower() in record["output"].lower())
    check_summary_against_records(summary, records)
    # The paper's request: its JSON system message and reply format, the bare question.
    questions = {record["messages"][1]["content"].removeprefix("Question: ") for record in records}
    for body in asked:
        system, user = body["messages"]
        assert system == {"role": "system", "content": "You are a helpful assistant designed to output JSON."}
        assert body["response_format"] == {"type": "json_object"}
        assert user["content"].split("## Question:\n")[1].split("\n\n## Model's answer:")[0] in questions
    assert len(asked) == len(records)


def test_bad_invocations_exit_with_a_message(stack: Stack, tmp_path: Path) -> None:
    base_only = tmp_path / "base-only.yaml"
    base_only.write_text(
        yaml.safe_dump(
            {
                "models": [
                    {
                        "name": "b",
                        "method": "base_only",
                        "base": {"url": "http://127.0.0.1:9/v1", "model": "base"},
                    }
                ]
            }
        )
    )
    with pytest.raises(SystemExit, match="no model in the config has method 'nudging'"):
        main(
            [
                "--dataset",
                "synthetic_arithmetic",
                "--exp",
                "nudging",
                "--config",
                str(base_only),
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit, match="runs 'base_only', not 'nudging'"):
        main(
            [
                "--dataset",
                "synthetic_arithmetic",
                "--exp",
                "nudging",
                "--config",
                str(stack.config),
                "--model",
                "base",
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit, match="--endpoint needs --model"):
        main(
            [
                "--dataset",
                "synthetic_arithmetic",
                "--exp",
                "nudging",
                "--endpoint",
                "http://x/v1",
                "--out",
                str(tmp_path),
            ]
        )


def test_rescore_scores_stored_outputs_again_without_generating(stack: Stack, tmp_path: Path) -> None:
    argv = [
        "--dataset",
        "synthetic_arithmetic",
        "--exp",
        "base_only",
        "--config",
        str(stack.config),
        "--num-samples",
        "3",
        "--max-tokens",
        "20",
        "--out",
        str(tmp_path),
    ]
    asyncio.run(evaluate(eval_args(*argv)))
    [path] = tmp_path.glob("*.jsonl")
    records = read_records(path)
    first = records[0]
    # As if the output had been scored by older rules: a right answer marked wrong.
    records[0] = {
        **first,
        "output": f"So the answer is {first['gold']}.",
        "extracted": None,
        "correct": False,
    }
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    [summary] = asyncio.run(evaluate(eval_args(*argv, "--rescore")))
    rescored = {r["id"]: r for r in read_records(path)}
    assert rescored[first["id"]]["output"] == f"So the answer is {first['gold']}."  # nothing generated
    assert rescored[first["id"]]["extracted"] == first["gold"] and rescored[first["id"]]["correct"] is True
    check_summary_against_records(summary, list(rescored.values()))
