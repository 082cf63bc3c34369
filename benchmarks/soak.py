"""Minutes of concurrent nudged streams through the proxy: errors, and the proxy's memory.

Starts the simulator pair (its fixed latency model; `--time-scale` shortens it) and the proxy,
each in its own process, keeps `--concurrency` streamed chat requests in flight for
`--minutes`, and reads the proxy's resident memory (VmRSS in /proc) after a warm-up, every
30 s, and at the end. An error is a status other than 200, an error event, a stream without
`[DONE]` or a failed connection. Prints figures; asserts nothing.

    python benchmarks/soak.py [--minutes 5] [--concurrency 32] [--max-tokens 128] [--time-scale 1]
                               [--probe-window 4[,256...]]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
from processes import percentile, proxy, simulator

QUESTIONS = [
    "Why do leaves change color in autumn?",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "Explain how vaccines train the immune system.",
    "Why is the ocean salty?",
    "How do airplanes stay in the air?",
    "How does compound interest work?",
    "How do bees make honey?",
]
SAMPLE_EVERY = 30.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def _stream(client: httpx.AsyncClient, question: str, max_tokens: int) -> str | None:
    """None if the stream completed, else what went wrong."""
    body = {"model": "nudged", "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": question}]}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            last = ""
            async for line in response.aiter_lines():
                if line.startswith('data: {"error"'):
                    return "error event"
                if line.startswith("data: "):
                    last = line
            return None if last == "data: [DONE]" else "no [DONE]"
    except httpx.HTTPError as error:
        return type(error).__name__


async def _soak(url: str, pid: int, args: argparse.Namespace) -> None:
    errors: Counter[str] = Counter()
    walls: list[float] = []
    deadline = time.monotonic() + args.minutes * 60
    limits = httpx.Limits(max_connections=args.concurrency)

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        turn = index
        while time.monotonic() < deadline:
            started = time.perf_counter()
            problem = await _stream(client, QUESTIONS[turn % len(QUESTIONS)], args.max_tokens)
            walls.append(time.perf_counter() - started)
            if problem is not None:
                errors[problem] += 1
            turn += 1

    async def sample() -> None:
        await asyncio.sleep(args.warmup)
        baseline = rss_mib(pid)
        print(f"after {args.warmup:.0f} s warm-up: proxy RSS {baseline:.1f} MiB, {len(walls)} streams done",
              flush=True)
        while time.monotonic() < deadline:
            await asyncio.sleep(min(SAMPLE_EVERY, max(0.0, deadline - time.monotonic())))
            print(f"  {len(walls):6d} streams, {sum(errors.values())} errors, RSS {rss_mib(pid):.1f} MiB",
                  flush=True)
        end = rss_mib(pid)
        growth = (end / baseline - 1) * 100
        print(f"RSS growth after warm-up: {baseline:.1f} -> {end:.1f} MiB ({growth:+.1f}%)")

    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(sample(), *(worker(i, client) for i in range(args.concurrency)))
    elapsed = time.monotonic() - started
    print(f"{len(walls)} streams in {elapsed:.0f} s ({len(walls) / elapsed:.1f}/s), "
          f"wall p50 {percentile(walls, 0.5):.2f} s, p99 {percentile(walls, 0.99):.2f} s")
    print(f"errors: {sum(errors.values())}" + (f" {dict(errors)}" if errors else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the first RSS reading")
    parser.add_argument("--probe-window", default="4", metavar="W[,W...]",
                        help="the model's probe_window; several values soak one after the other")
    args = parser.parse_args()
    for window in [int(value) for value in args.probe_window.split(",")]:
        print(f"{args.concurrency} concurrent nudged chat streams for {args.minutes:g} min, "
              f"max_tokens {args.max_tokens}, simulator time scale {args.time_scale:g}, "
              f"probe_window {window}")
        with simulator("base", args.time_scale) as base, simulator("aligned", args.time_scale) as aligned:
            models = [{"name": "nudged", "probe_window": window,
                       "base": {"url": base + "/v1", "model": "base"},
                       "nudging": {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}}]
            with proxy(models) as (url, pid):
                asyncio.run(_soak(url, pid, args))


if __name__ == "__main__":
    main()
