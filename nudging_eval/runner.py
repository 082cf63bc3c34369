"""Run samples through a backend, K at a time, one JSONL record per sample as it finishes.

A run is resumable: records already in its file are kept and their samples skipped (a
record of a failed sample is retried), unless `rerun` starts the file afresh. Every record
carries the run's settings, so a file is never resumed with different ones.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from nudging_core.provenance import Span, nudging_word_ratio

from .backends import Backend, Outcome
from .datasets import Sample
from .judge import Judge
from .scoring import ran_on, score


@dataclass(frozen=True, slots=True)
class RunSettings:
    dataset: str
    exp: str
    model: str
    threshold: float | None
    max_tokens: int | None


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


def make_record(
    sample: Sample, settings: RunSettings, outcome: Outcome, latency: float, verdict: dict[str, Any] | None
) -> dict[str, Any]:
    scored = score(sample.answer_type, outcome.output, sample.gold, sample.choices)
    spans = outcome.spans
    correct = scored.correct
    if verdict is not None and verdict.get("correct") is not None:
        correct = verdict["correct"]  # the judge decides where it was asked
    return {
        "id": sample.id,
        "settings": asdict(settings),
        "messages": sample.messages(),
        "output": outcome.output,
        "gold": sample.gold,
        "reference": sample.reference,
        "extracted": scored.extracted,
        "correct": correct,
        "rule_correct": scored.correct,
        "judge": verdict,
        "finish_reason": outcome.finish_reason,
        "stop_reason": outcome.stop_reason,
        # Judge-free format: ended by itself within the budget; did not run on into a new turn.
        "ended": outcome.finish_reason == "stop",
        "ran_on": ran_on(outcome.output),
        "spans": spans,
        "nudging_words": [s["text"] for s in spans if s["source"] == "nudging"]
        if spans is not None
        else None,
        "nudging_word_ratio": (
            nudging_word_ratio(
                Span(s["text"], "nudging" if s["source"] == "nudging" else "base") for s in spans
            )
            if spans is not None
            else None
        ),
        "rounds": outcome.rounds,
        "upstream_requests": outcome.upstream_requests,
        "completion_tokens": outcome.completion_tokens,
        "latency_s": round(latency, 4),
    }


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
) -> list[dict[str, Any]]:
    """Records of every sample, in the samples' order (resumed ones read from `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if rerun and path.exists():
        path.unlink()
    kept = {record["id"]: record for record in checked_records(path, settings) if "error" not in record}
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
                outcome = await backend.generate(sample, settings.max_tokens, settings.threshold)
                latency = time.perf_counter() - started
                verdict = None
                if judge is not None:
                    judged = await judge.verdict(settings.dataset, sample, outcome.output)
                    verdict = asdict(judged)
                record = make_record(sample, settings, outcome, latency, verdict)
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


def rescore(samples: Sequence[Sample], settings: RunSettings, path: Path) -> list[dict[str, Any]]:
    """A results file scored again by the current rules, without generating anything: the
    outputs stay, `extracted`, `rule_correct`, `ran_on` and `correct` are recomputed (a judge's
    verdict still decides `correct`). Records of the samples, in their order."""
    records = checked_records(path, settings)
    if not records:
        raise ValueError(f"{path} holds no results to rescore")
    wanted = {sample.id: sample for sample in samples}
    for record in records:
        sample = wanted.get(record["id"])
        if sample is None or "error" in record:
            continue
        scored = score(sample.answer_type, record["output"], sample.gold, sample.choices)
        judged = (record.get("judge") or {}).get("correct")
        record.update(
            extracted=scored.extracted,
            rule_correct=scored.correct,
            correct=scored.correct if judged is None else judged,
            ran_on=ran_on(record["output"]),
        )
    rewritten = path.with_name(path.name + ".tmp")
    rewritten.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    rewritten.replace(path)  # whole or not at all
    by_id = {record["id"]: record for record in records}
    return [by_id[sample.id] for sample in samples if sample.id in by_id]
