"""Goodput under overload: a constant request rate at multiples of the measured capacity.

Starts the simulator pair (base, aligned) at their default latency and a proxy, each in its own
process. Per method (`nudged`: strategy `fast`; `base_only`) it first measures the capacity:
answers/s with `--concurrency` streams, closed loop. Then it offers an open-loop load (a request
every 1/rate seconds, whatever the answers do) at 0.5x, 1x, 2x and 4x that capacity for
`--seconds`, to the model with admission control (`max_concurrent` = `--concurrency`, a queue
of `--queued` waiting at most `--queue-timeout` s) and, with `--ungated`, to the same model
without it. Each request is a streamed chat answer; a client gives up after `--deadline`
seconds. Per run it prints:

- goodput: answers completed within the deadline, per second of offered load;
- p50 / p99 latency of those answers (request to `[DONE]`);
- rejections (429 from admission control), late answers (the client gave up) and other errors.

Prints figures; asserts nothing.

    python benchmarks/overload.py [--seconds 15] [--deadline 10] [--concurrency 8] [--max-tokens 64]
                                  [--queued 8] [--queue-timeout 2] [--rates 0.5,1,2,4]
                                  [--methods nudged,base_only] [--ungated]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from processes import percentile, proxy, simulator

QUESTIONS = [
    "Why do leaves change color in autumn?",
    "How does a refrigerator keep food cold?",
    "What causes the tides in the ocean?",
    "How do vaccines train the immune system?",
]
GATED_SUFFIX = "+gate"


@dataclass(slots=True)
class Outcomes:
    latencies: list[float] = field(default_factory=list)  # of answers completed within the deadline
    counts: Counter[str] = field(default_factory=Counter)  # "ok", "rejected", "late", "error"


async def _answer(client: httpx.AsyncClient, model: str, question: str, args: argparse.Namespace,
                  outcomes: Outcomes) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": args.max_tokens, "stream": True}
    started = time.perf_counter()
    try:
        async with asyncio.timeout(args.deadline), client.stream("POST", "/v1/chat/completions",
                                                                 json=body) as response:
            if response.status_code == 429:
                outcomes.counts["rejected"] += 1
                return
            if response.status_code != 200:
                outcomes.counts["error"] += 1
                return
            finished = False
            async for line in response.aiter_lines():
                if line.startswith('data: {"error"'):
                    break
                finished = finished or line == "data: [DONE]"
    except TimeoutError:
        outcomes.counts["late"] += 1
        return
    except httpx.HTTPError:
        outcomes.counts["error"] += 1
        return
    if not finished:
        outcomes.counts["error"] += 1
        return
    outcomes.counts["ok"] += 1
    outcomes.latencies.append(time.perf_counter() - started)


def _client(url: str, args: argparse.Namespace) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    return httpx.AsyncClient(base_url=url, timeout=args.deadline + 5, limits=limits)


async def _capacity(url: str, model: str, args: argparse.Namespace) -> float:
    """Answers/s with `args.concurrency` streams, each asking again as soon as it is answered."""
    async with _client(url, args) as client:
        outcomes = Outcomes()
        answers = 3 * args.concurrency
        remaining = list(range(answers))

        async def worker() -> None:
            while remaining:
                index = remaining.pop()
                await _answer(client, model, QUESTIONS[index % len(QUESTIONS)], args, outcomes)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))  # warm up
        remaining.extend(range(answers))
        outcomes = Outcomes()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return outcomes.counts["ok"] / (time.perf_counter() - started)


async def _offer(url: str, model: str, rate: float, args: argparse.Namespace) -> Outcomes:
    """A request every 1/rate seconds for `args.seconds`, each on its own; waits for all."""
    outcomes = Outcomes()
    async with _client(url, args) as client:
        tasks = []
        started = time.perf_counter()
        for index in range(int(rate * args.seconds)):
            # Sent on schedule, not when earlier answers come: an open loop, as real clients are.
            await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
            question = QUESTIONS[index % len(QUESTIONS)]
            tasks.append(asyncio.create_task(_answer(client, model, question, args, outcomes)))
        await asyncio.gather(*tasks)
    return outcomes


def _row(method: str, gated: bool, multiple: float, rate: float, outcomes: Outcomes,
         seconds: float) -> str:
    latencies = outcomes.latencies
    p50 = percentile(latencies, 0.5) if latencies else float("nan")
    p99 = percentile(latencies, 0.99) if latencies else float("nan")
    counts = outcomes.counts
    return (f"{method:9} {'yes' if gated else 'no':>9} {multiple:5g}x {rate:7.2f} "
            f"{counts['ok'] / seconds:9.2f} {p50:7.2f} {p99:7.2f} {counts['rejected']:9} "
            f"{counts['late']:5} {counts['error']:6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="how long each load is offered")
    parser.add_argument("--deadline", type=float, default=10, help="a client gives up after this")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="streams when measuring capacity, and the gated model's max_concurrent")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--queued", type=int, default=8, help="the gated model's max_queued")
    parser.add_argument("--queue-timeout", type=float, default=2,
                        help="the gated model's queue_timeout_seconds")
    parser.add_argument("--rates", default="0.5,1,2,4", help="multiples of the measured capacity")
    parser.add_argument("--methods", default="nudged,base_only")
    parser.add_argument("--ungated", action="store_true",
                        help="also load each model without admission control")
    args = parser.parse_args()
    multiples = [float(value) for value in args.rates.split(",")]
    with simulator("base", 1.0) as base, simulator("aligned", 1.0) as aligned:
        base_model = {"url": base + "/v1", "model": "base"}
        aligned_model = {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}
        methods = {"nudged": {"base": base_model, "nudging": aligned_model, "strategy": "fast"},
                   "base_only": {"method": "base_only", "base": base_model}}
        gate = {"max_concurrent": args.concurrency, "max_queued": args.queued,
                "queue_timeout_seconds": args.queue_timeout}
        models = [{"name": name, **settings} for name, settings in methods.items()]
        models += [{"name": name + GATED_SUFFIX, **settings, **gate} for name, settings in methods.items()]
        with proxy(models) as (url, _pid):
            print(f"{'method':9} {'admission':>9} {'load':>6} {'req/s':>7} {'goodput':>9} {'p50 s':>7} "
                  f"{'p99 s':>7} {'rejected':>9} {'late':>5} {'errors':>6}")
            for method in args.methods.split(","):
                capacity = asyncio.run(_capacity(url, method, args))
                print(f"# {method}: capacity {capacity:.2f} answers/s at {args.concurrency} streams",
                      flush=True)
                for gated in [True, False] if args.ungated else [True]:
                    model = method + GATED_SUFFIX if gated else method
                    for multiple in multiples:
                        rate = multiple * capacity
                        outcomes = asyncio.run(_offer(url, model, rate, args))
                        print(_row(method, gated, multiple, rate, outcomes, args.seconds), flush=True)


if __name__ == "__main__":
    main()
