"""How often our baselines write the seed's text: the corpus prompts on the simulator trio.

Runs the seed's `completion_baseline_ensemble` / `completion_baseline_proxy_tuning` and ours
on the same simulators with the seed's prompt layouts and prints, per method, how many
answers differ and how ours ended. Where our budget ends the answer, ours only has to begin
the seed's (the seed asks for whole chunks and overshoots its budget). Prints figures;
asserts nothing.

    python -m tests.seed_baseline_compare [--max-tokens 600] [--limit N]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from collections import Counter
from pathlib import Path

from .corpus_prompts import CORPUS
from .seed_code import seed_module
from .test_baselines import matches_the_seed, our_baseline, seed_baseline, seed_prompts, simulator_upstreams


async def compare(max_tokens: int, limit: int | None) -> None:
    seed = seed_module("utils", Path(tempfile.mkdtemp()))
    questions = [prompt.user for prompt in CORPUS][:limit]
    with simulator_upstreams() as upstreams:
        for method in ("ensemble", "proxy_tuning"):
            differ, endings = 0, Counter[str]()
            for question in questions:
                prompts = seed_prompts(question)
                ours, stats = await our_baseline(upstreams, method, *prompts, max_tokens)
                theirs = await asyncio.to_thread(seed_baseline, seed, upstreams, method, *prompts, max_tokens)
                differ += not matches_the_seed(ours, stats, theirs)
                endings[str(stats.stop_reason)] += 1
            print(f"{method}: {differ}/{len(questions)} answers differ from the seed's; "
                  f"ours ended {dict(endings)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=600)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    asyncio.run(compare(args.max_tokens, args.limit))


if __name__ == "__main__":
    main()
