"""`nudging-proxy eval`: run one of the paper's experiments over a dataset and report it.

In-process (`--config`): the config's upstreams through the server's own core. Against a
server (`--endpoint URL`): any OpenAI-compatible endpoint, e.g. a running proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from nudging_core.config import Config, ConfigError, load_config
from nudging_core.nudging import Strategy

from .backends import Backend, EndpointBackend, InProcessBackend
from .datasets import DATASETS, Sample, load_samples
from .judge import Judge
from .report import markdown_table, named, plot_sweep, summarize, write_summary
from .runner import RunSettings, SettingsMismatch, rescore, run_samples
from .scoring import Scoring
from .synthetic import SYNTHETIC, generate

EXPERIMENTS = ("base_only", "nudging_only", "nudging", "proxy_tuning", "ensemble")
STRATEGIES = get_args(Strategy)
SCORINGS = ("ours", "paper")


def _thresholds(value: str) -> list[float]:
    try:
        thresholds = [float(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {value!r}") from None
    if not thresholds or any(not 0 < t <= 1 for t in thresholds):
        raise argparse.ArgumentTypeError("thresholds must lie in (0, 1]")
    return thresholds


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [*DATASETS, *SYNTHETIC]
    parser.add_argument("--dataset", required=True, choices=names, metavar="NAME", help=", ".join(names))
    parser.add_argument(
        "--exp",
        required=True,
        choices=EXPERIMENTS,
        metavar="METHOD",
        help="the paper's experiment: " + ", ".join(EXPERIMENTS),
    )
    parser.add_argument("--config", help="proxy config; in-process runs use its upstreams")
    parser.add_argument("--model", help="model name (default: the config's first model of the --exp method)")
    parser.add_argument(
        "--endpoint",
        help="an OpenAI-compatible base URL (e.g. http://127.0.0.1:8080/v1) instead of running in-process",
    )
    parser.add_argument("--api-key-env", help="env var with the --endpoint's API key")
    parser.add_argument("--num-samples", type=_positive, help="sample this many (the paper's seed 609)")
    parser.add_argument("--split", help="dataset split (default: the paper's)")
    parser.add_argument("--data", help="a local JSONL file of rows in the dataset's hub schema")
    parser.add_argument("--difficulty", type=_positive, default=2, help="synthetic tasks: steps/people/words")
    parser.add_argument("--seed", type=int, default=0, help="synthetic tasks: generator seed")
    parser.add_argument("--concurrency", type=_positive, default=4, help="samples in flight")
    parser.add_argument("--threshold", type=_thresholds, help="γ, or a comma-separated sweep (nudging only)")
    parser.add_argument(
        "--strategy", choices=STRATEGIES, help="nudging's strategy (nudging only; default: the model's)"
    )
    parser.add_argument(
        "--cleanup",
        action=argparse.BooleanOptionalAction,
        help="the paper's clean-up of repeated endings (default: on for --exp nudging, as the paper ran it)",
    )
    parser.add_argument(
        "--scoring",
        choices=SCORINGS,
        default="ours",
        help="ours: our extractors on the answer before any run-on; paper: the paper's rule on math sets",
    )
    parser.add_argument("--max-tokens", type=_positive, help="answer budget (default: the model's)")
    parser.add_argument("--out", default="eval-runs", help="directory for results and summaries")
    parser.add_argument("--rerun", action="store_true", help="start afresh instead of resuming")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score an existing run again by the current rules; no generation",
    )
    parser.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of an LLM judge")
    parser.add_argument("--judge-model", help="the judge's model name")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="env var with the judge's key")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _samples(args: argparse.Namespace) -> list[Sample]:
    if args.dataset in SYNTHETIC:
        return generate(args.dataset, args.num_samples, args.difficulty, args.seed)
    return load_samples(args.dataset, args.split, args.num_samples, data_file=args.data)


def _model_for(config: Config, exp: str, name: str | None) -> str:
    if name is not None:
        model = config.model(name)
        if model is None:
            raise ValueError(f"model {name!r} is not in the config")
        if model.method != exp:
            raise ValueError(f"model {name!r} runs {model.method!r}, not {exp!r}")
        return name
    for model in config.models:
        if model.method == exp:
            return model.name
    raise ValueError(f"no model in the config has method {exp!r}; add one or pass --model")


def _target(args: argparse.Namespace) -> tuple[Config | None, str]:
    """The config to run in-process (None for an endpoint) and the model name."""
    if args.endpoint:
        if not args.model:
            raise ValueError("--endpoint needs --model")
        return None, args.model
    if not args.config:
        raise ValueError("give --config (in-process) or --endpoint")
    config = load_config(args.config)
    return config, _model_for(config, args.exp, args.model)


def _backend(args: argparse.Namespace, config: Config | None, model: str) -> Backend:
    if config is None:
        return EndpointBackend(args.endpoint, model, args.api_key_env)
    return InProcessBackend(config, model)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def run_name(settings: RunSettings) -> str:
    threshold = f"-t{settings.threshold:g}" if settings.threshold is not None else ""
    strategy = f"-{settings.strategy}" if settings.strategy is not None else ""
    return f"{settings.dataset}-{settings.exp}-{_safe(settings.model)}{threshold}{strategy}"


async def evaluate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every threshold asked for; returns one summary per run."""
    thresholds: list[float | None] = list(args.threshold) if args.threshold else [None]
    if len(thresholds) > 1 and args.exp != "nudging":
        raise ValueError("a threshold sweep needs --exp nudging")
    if args.judge_endpoint and not args.judge_model:
        raise ValueError("--judge-endpoint needs --judge-model")
    if args.strategy is not None and args.exp != "nudging":
        raise ValueError("--strategy needs --exp nudging")
    cleanup = args.exp == "nudging" if args.cleanup is None else args.cleanup
    scoring: Scoring = args.scoring
    samples = _samples(args)
    config, model = _target(args)
    backend = None if args.rescore else _backend(args, config, model)
    judge = (
        Judge(args.judge_endpoint, args.judge_model, args.judge_api_key_env)
        if args.judge_endpoint and backend is not None
        else None
    )
    out = Path(args.out)
    summaries = []
    try:
        for threshold in thresholds:
            settings = RunSettings(
                args.dataset, args.exp, model, threshold, args.max_tokens, args.strategy, cleanup
            )
            stem = out / run_name(settings)
            if backend is None:
                records = rescore(samples, settings, named(stem, ".jsonl"), scoring)
            else:
                records = await run_samples(
                    samples,
                    backend,
                    settings,
                    named(stem, ".jsonl"),
                    concurrency=args.concurrency,
                    rerun=args.rerun,
                    judge=judge,
                    progress=not args.no_progress,
                    scoring=scoring,
                )
            summary = summarize(records)
            write_summary([summary], named(stem, ".summary"))
            summaries.append(summary)
    finally:
        if backend is not None:
            await backend.aclose()
        if judge is not None:
            await judge.aclose()
    if len(summaries) > 1:
        sweep = out / f"{args.dataset}-{args.exp}-{_safe(summaries[0]['model'])}-sweep"
        write_summary(summaries, sweep)
        plot_sweep(summaries, named(sweep, ".png"))
    return summaries


def run(args: argparse.Namespace) -> None:
    try:
        summaries = asyncio.run(evaluate(args))
    except (ConfigError, SettingsMismatch, ValueError, OSError) as error:
        sys.exit(f"nudging-proxy eval: {error}")
    print(markdown_table(summaries), end="")
    failed = sum(summary["errors"] for summary in summaries)
    if failed:
        print(
            f"{failed} samples failed (their records hold the error); run again to retry them",
            file=sys.stderr,
        )
    print(f"results in {args.out}/", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nudging-proxy eval", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(argv))
