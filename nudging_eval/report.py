"""Summaries of a run's records (printed, JSON, Markdown) and the threshold sweep's plot.

Every number here is computed from the JSONL records alone, so a summary can be checked
against (or rebuilt from) its results file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from statistics import mean
from typing import Any

Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ((0, 1) for no trials)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # At 0 or n successes a bound is exactly 0 or 1; rounding would leave a trace.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(mean(known)) if known else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    answered = [r for r in records if "error" not in r]
    scored = [r for r in answered if r["correct"] is not None]
    correct = sum(1 for r in scored if r["correct"])
    low, high = wilson_interval(correct, len(scored))
    settings = records[0]["settings"] if records else {}
    requests = [sum(r["upstream_requests"].values()) if r["upstream_requests"] else None for r in answered]
    judge_scores = [r["judge"]["score"] if r.get("judge") else None for r in answered]
    return {
        **settings,
        "scoring": answered[0].get("scoring") if answered else None,
        "samples": len(records),
        "errors": len(records) - len(answered),
        "scored": len(scored),
        "correct": correct,
        "accuracy": correct / len(scored) if scored else None,
        "accuracy_ci95": [low, high] if scored else None,
        # How often the rules found an answer at all (a wrong answer and none are both "wrong").
        "answer_found_rate": _mean([float(r["extracted"] is not None) for r in scored]),
        "judge_score": _mean(judge_scores),
        "nudging_word_ratio": _mean([r["nudging_word_ratio"] for r in answered]),
        # The paper's count: before clean-up, without each answer's last nudging words.
        "paper_nudging_word_ratio": _mean([r.get("paper_nudging_word_ratio") for r in answered]),
        "ended_rate": _mean([float(r["ended"]) for r in answered]),
        "clean_rate": _mean([float(not r["ran_on"]) for r in answered]),
        "mean_rounds": _mean([r["rounds"] for r in answered]),
        "requests_per_sample": _mean(requests),
        "mean_completion_tokens": _mean([r["completion_tokens"] for r in answered]),
        "mean_latency_s": _mean([r["latency_s"] for r in answered]),
    }


def _cell(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v, percent) for v in value) + "]"
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if percent else f"{value:.2f}"
    return str(value)


COLUMNS = (
    ("exp", "exp", False),
    ("threshold", "γ", False),
    ("samples", "n", False),
    ("errors", "errors", False),
    ("accuracy", "accuracy", True),
    ("accuracy_ci95", "95% CI", True),
    ("answer_found_rate", "answer found", True),
    ("nudging_word_ratio", "nudging words", True),
    ("paper_nudging_word_ratio", "nudging words (paper)", True),
    ("ended_rate", "ended", True),
    ("clean_rate", "no run-on", True),
    ("mean_rounds", "rounds", False),
    ("requests_per_sample", "requests", False),
    ("mean_latency_s", "latency s", False),
)


def markdown_table(summaries: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for summary in summaries:
        lines.append("| " + " | ".join(_cell(summary.get(key), pct) for key, _, pct in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def named(stem: Path, extension: str) -> Path:
    """`stem` + `extension`; not `with_suffix`, which takes the ".3" of "t0.3" for a suffix."""
    return stem.parent / (stem.name + extension)


def write_summary(summaries: Sequence[dict[str, Any]], stem: Path) -> None:
    """`stem`.json and `stem`.md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload: Any = summaries[0] if len(summaries) == 1 else list(summaries)
    named(stem, ".json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    first = summaries[0]
    title = f"# {first.get('dataset')}: {first.get('model')}\n\n"
    named(stem, ".md").write_text(title + markdown_table(summaries), encoding="utf-8")


def plot_sweep(summaries: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy (with its interval) and nudging ratio against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((s for s in summaries if s.get("threshold") is not None), key=lambda s: s["threshold"])
    thresholds = [s["threshold"] for s in points]
    accuracy = [s["accuracy"] or 0.0 for s in points]
    low = [a - (s["accuracy_ci95"] or [a, a])[0] for a, s in zip(accuracy, points, strict=True)]
    high = [(s["accuracy_ci95"] or [a, a])[1] - a for a, s in zip(accuracy, points, strict=True)]
    ratio = [s["nudging_word_ratio"] or 0.0 for s in points]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.errorbar(thresholds, accuracy, yerr=[low, high], marker="o", capsize=3, label="accuracy (95% CI)")
    axis.plot(thresholds, ratio, marker="s", linestyle="--", label="nudging word ratio")
    axis.set_xlabel("threshold γ (base top-1 probability)")
    axis.set_ylim(0, 1)
    first = points[0] if points else {}
    axis.set_title(f"{first.get('dataset', '')}: {first.get('model', '')}")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
