"""Run samples through a backend, K at a time, one JSONL record per sample as it finishes.

A run is resumable: records already in its file are kept and their samples skipped (a
record of a failed sample is retried), unless `rerun` starts the file afresh. Every record
carries the run's settings, so a file is never resumed with different ones; a kept record
scored by other rules is scored again.

With `cleanup` the answer is cleaned here as the paper cleaned nudged answers (strip, then
drop repeated suffixes); the record keeps the text before (`raw_output`), where the paper
counts its nudging words.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from nudging_core.nudging import Strategy, cleaned_bounds
from nudging_core.provenance import Span, nudging_word_ratio

from .backends import AnswerOptions, Backend, BackendAnswer
from .datasets import Sample
from .judge import Judge
from .paper_rules import paper_nudging_word_ratio
from .scoring import Scoring, ran_on, score_sample


@dataclass(frozen=True, slots=True)
class RunSettings:
    dataset: str
    exp: str
    model: str
    threshold: float | None
    max_tokens: int | None
    strategy: Strategy | None = None  # None: the model's configured strategy
    cleanup: bool = False

    def answer_options(self) -> AnswerOptions:
        return AnswerOptions(self.max_tokens, self.threshold, self.strategy)


class SettingsMismatch(ValueError):
    """A results file made with other settings than this run's."""


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a results file; a line cut by an interruption is dropped from
    the file too, so appending continues on a clean line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    if complete != text:
        path.write_text(complete, encoding="utf-8")
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def checked_records(path: Path, settings: RunSettings) -> list[dict[str, Any]]:
    """The records of `path`, refusing a file made with other settings."""
    records = read_records(path)
    for record in records:
        if record.get("settings") != asdict(settings):
            raise SettingsMismatch(
                f"{path} holds results of other settings ({record.get('settings')}); "
                "pass --rerun or another --out"
            )
    return records


def clip_spans(spans: list[dict[str, str]], start: int, end: int) -> list[dict[str, str]]:
    """The spans of the text's characters start..end."""
    clipped, offset = [], 0
    for span in spans:
        span_start, offset = offset, offset + len(span["text"])
        text = span["text"][max(0, start - span_start) : max(0, end - span_start)]
        if text:
            clipped.append({**span, "text": text})
    return clipped


def cleaned(outcome: BackendAnswer) -> BackendAnswer:
    """The answer after the paper's clean-up, its spans cut to match."""
    start, end = cleaned_bounds(outcome.output)
    spans = clip_spans(outcome.spans, start, end) if outcome.spans is not None else None
    return replace(outcome, output=outcome.output[start:end], spans=spans)


def _our_ratio(spans: list[dict[str, str]] | None) -> float | None:
    if spans is None:
        return None
    return nudging_word_ratio(
        Span(s["text"], "nudging" if s["source"] == "nudging" else "base") for s in spans
    )


def _paper_ratio(settings: RunSettings, raw: BackendAnswer) -> float | None:
    # The paper recorded nudging words for nudging runs only.
    if settings.exp != "nudging" or raw.round_nudging_words is None:
        return None
    return paper_nudging_word_ratio(raw.output, raw.round_nudging_words)


def _scores(sample: Sample, output: str, scoring: Scoring, verdict: dict[str, Any] | None) -> dict[str, Any]:
    scored = score_sample(sample, output, scoring)
    judged = (verdict or {}).get("correct")
    return {
        "scoring": scoring,
        "extracted": scored.extracted,
        "correct": scored.correct if judged is None else judged,  # the judge decides where it was asked
        "rule_correct": scored.correct,
        "ran_on": ran_on(output),
    }


def final_answer(raw: BackendAnswer, settings: RunSettings) -> BackendAnswer:
    return cleaned(raw) if settings.cleanup else raw


def make_record(
    sample: Sample,
    settings: RunSettings,
    raw: BackendAnswer,
    latency: float,
    verdict: dict[str, Any] | None,
    scoring: Scoring = "ours",
) -> dict[str, Any]:
    """The record of one answer; `raw` is the answer as generated, before any clean-up."""
    answer = final_answer(raw, settings)
    return {
        "id": sample.id,
        "settings": asdict(settings),
        "messages": sample.messages(),
        "output": answer.output,
        "raw_output": raw.output,
        "gold": sample.gold,
        "reference": sample.reference,
        **_scores(sample, answer.output, scoring, verdict),
        "judge": verdict,
        "finish_reason": answer.finish_reason,
        "stop_reason": answer.stop_reason,
        # Judge-free format: ended by itself within the budget; did not run on into a new turn.
        "ended": answer.finish_reason == "stop",
        "spans": answer.spans,
        "nudging_words": raw.round_nudging_words,
        "nudging_word_ratio": _our_ratio(answer.spans),
        "paper_nudging_word_ratio": _paper_ratio(settings, raw),
        "rounds": answer.rounds,
        "upstream_requests": answer.upstream_requests,
        "completion_tokens": answer.completion_tokens,
        "latency_s": round(latency, 4),
    }


def scored_again(
    records: Sequence[dict[str, Any]], samples: Sequence[Sample], scoring: Scoring
) -> list[dict[str, Any]]:
    """The records with their stored outputs scored by `scoring` (a judge's verdict still
    decides); records of failed or unknown samples as they are."""
    wanted = {sample.id: sample for sample in samples}
    return [
        {**r, **_scores(wanted[r["id"]], r["output"], scoring, r.get("judge"))}
        if r["id"] in wanted and "error" not in r
        else r
        for r in records
    ]


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    rewritten = path.with_name(path.name + ".tmp")
    rewritten.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    rewritten.replace(path)  # whole or not at all


def error_record(sample: Sample, settings: RunSettings, error: BaseException) -> dict[str, Any]:
    return {"id": sample.id, "settings": asdict(settings), "error": f"{type(error).__name__}: {error}"}


async def run_samples(
    samples: Sequence[Sample],
    backend: Backend,
    settings: RunSettings,
    path: Path,
    *,
    concurrency: int = 4,
    rerun: bool = False,
    judge: Judge | None = None,
    progress: bool = True,
    scoring: Scoring = "ours",
) -> list[dict[str, Any]]:
    """Records of every sample, in the samples' order (resumed ones read from `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if rerun and path.exists():
        path.unlink()
    records = checked_records(path, settings)
    if any(r.get("scoring") != scoring for r in records if "error" not in r):
        records = scored_again(records, samples, scoring)
        write_records(path, records)
    kept = {record["id"]: record for record in records if "error" not in record}
    todo = [sample for sample in samples if sample.id not in kept]
    from tqdm import tqdm  # type: ignore[import-untyped]  # the eval extra, not needed to build the CLI

    bar = tqdm(
        total=len(samples),
        initial=len(samples) - len(todo),
        desc=f"{settings.dataset} {settings.exp}",
        unit="sample",
        disable=not progress,
        dynamic_ncols=True,
    )
    slots = asyncio.Semaphore(concurrency)
    fresh: dict[str, dict[str, Any]] = {}

    async def one(sample: Sample, results: TextIO) -> None:
        async with slots:
            started = time.perf_counter()
            try:
                outcome = await backend.generate(sample, settings.answer_options())
                latency = time.perf_counter() - started
                verdict = None
                if judge is not None:
                    answer = final_answer(outcome, settings).output
                    verdict = asdict(await judge.verdict(settings.dataset, sample, answer))
                record = make_record(sample, settings, outcome, latency, verdict, scoring)
            except Exception as error:  # recorded, and retried by the next resume
                record = error_record(sample, settings, error)
        results.write(json.dumps(record, ensure_ascii=False) + "\n")
        results.flush()
        fresh[sample.id] = record
        bar.update(1)

    try:
        with path.open("a", encoding="utf-8") as results:
            await asyncio.gather(*(one(sample, results) for sample in todo))
    finally:
        bar.close()
    done = {**kept, **fresh}
    return [done[sample.id] for sample in samples if sample.id in done]


def rescore(
    samples: Sequence[Sample], settings: RunSettings, path: Path, scoring: Scoring = "ours"
) -> list[dict[str, Any]]:
    """A results file scored again by `scoring`, without generating anything: the outputs
    stay, the scores and `ran_on` are recomputed (a judge's verdict still decides `correct`).
    Records of the samples, in their order."""
    records = checked_records(path, settings)
    if not records:
        raise ValueError(f"{path} holds no results to rescore")
    records = scored_again(records, samples, scoring)
    write_records(path, records)
    by_id = {record["id"]: record for record in records}
    return [by_id[sample.id] for sample in samples if sample.id in by_id]
