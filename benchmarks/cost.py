"""What the proxy costs per answer: its own CPU time, the upstream work it causes, and speed.

Starts the simulator pair (base, aligned) with their default latency model and a proxy, each in
its own process, and streams chat answers through the proxy for `base_only`, `nudging` with
strategy `fast` and with `paper`, at 1, 16 and 64 concurrent streams. For each it prints:

- proxy CPU per answer token and per answer, read from the proxy process (user + system time
  in /proc), which load on the shared cores moves far less than wall time;
- base requests per answer, and base tokens generated per answer token (the simulators'
  /stats counters, so cancelled probes count what they generated before they were cancelled);
- base prompt tokens not served from the prefix cache, per answer;
- answers/s and the median time to the first text.

A method `fast:W` is `fast` with `probe_window` W (`--methods fast:1,fast:2,fast` compares
windows side by side).

With `--servers auto,asyncio/h11` one proxy runs per uvicorn stack (`server.loop`/`server.http`),
measured in turn in one run for each method and concurrency, so the stacks compare side by side.

Prints figures; asserts nothing.

    python benchmarks/cost.py [--answers 32] [--max-tokens 128] [--concurrency 1,16,64]
                              [--methods base_only,fast,paper] [--servers auto]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
from processes import proxy, simulator

QUESTIONS = [
    "Why do leaves change color in autumn?",
    "How does a refrigerator keep food cold?",
    "What causes the tides in the ocean?",
    "How do vaccines train the immune system?",
    "What was traded along the Silk Road?",
    "How does the internet route data between computers?",
    "What makes espresso different from drip coffee?",
    "How do chess players plan their opening moves?",
]
METHODS = ("base_only", "fast", "paper")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass(slots=True)
class Answer:
    tokens: int
    first_text: float | None  # seconds from the request to the first text


async def _answer(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> Answer:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_text: float | None = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first_text is None and any(c.get("delta", {}).get("content") for c in event["choices"]):
                first_text = time.perf_counter() - started
    return Answer(tokens, first_text)


async def _run(url: str, model: str, answers: int, concurrency: int,
               max_tokens: int) -> tuple[list[Answer], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue = [QUESTIONS[i % len(QUESTIONS)] for i in range(answers)]
        done: list[Answer] = []

        async def worker() -> None:
            while queue:
                done.append(await _answer(client, model, queue.pop(), max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - started


def _stats(url: str) -> dict[str, Any]:
    return dict(httpx.get(url + "/stats", timeout=10).json())


def _reset(url: str) -> None:
    httpx.post(url + "/stats/reset", timeout=10).raise_for_status()


def _server_settings(stack: str) -> dict[str, str]:
    """`auto` or `LOOP/HTTP` (e.g. `asyncio/h11`) as the proxy's `server` settings."""
    if stack == "auto":
        return {}
    loop, http = stack.split("/")
    return {"loop": loop, "http": http}


def _measure(url: str, pid: int, base: str, method: str, concurrency: int, args: argparse.Namespace) -> str:
    asyncio.run(_run(url, method, min(concurrency, 4), concurrency, 8))  # warm up
    _reset(base)
    cpu_before = cpu_seconds(pid)
    done, wall = asyncio.run(_run(url, method, max(args.answers, concurrency), concurrency, args.max_tokens))
    cpu = cpu_seconds(pid) - cpu_before
    stats = _stats(base)
    tokens = sum(answer.tokens for answer in done)
    firsts = [a.first_text for a in done if a.first_text is not None]
    uncached = stats["prompt_tokens_total"] - stats["prompt_tokens_cached"]
    return (f"{cpu / tokens * 1e6:12.0f} {cpu / len(done) * 1e3:13.1f} "
            f"{stats['requests_total'] / len(done):15.1f} {stats['tokens_generated'] / tokens:14.2f} "
            f"{uncached / len(done):22.0f} {len(done) / wall:9.2f} "
            f"{statistics.median(firsts) if firsts else float('nan'):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=32, help="answers per method and concurrency")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,16,64", help="comma-separated stream counts")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated, of " + ", ".join(METHODS) + " and fast:W (probe_window W)")
    parser.add_argument("--servers", default="auto",
                        help="comma-separated uvicorn stacks: auto (uvloop + httptools) or LOOP/HTTP")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    stacks = args.servers.split(",")
    methods = args.methods.split(",")
    with simulator("base", 1.0) as base, simulator("aligned", 1.0) as aligned, ExitStack() as proxies:
        base_model = {"url": base + "/v1", "model": "base"}
        aligned_model = {"url": aligned + "/v1", "model": "aligned", "chat_template": "chatml"}
        models: list[dict[str, Any]] = [
            {"name": "base_only", "method": "base_only", "base": base_model},
            {"name": "fast", "base": base_model, "nudging": aligned_model, "strategy": "fast"},
            {"name": "paper", "base": base_model, "nudging": aligned_model, "strategy": "paper"},
        ]
        models += [{"name": method, "base": base_model, "nudging": aligned_model, "strategy": "fast",
                    "probe_window": int(method.removeprefix("fast:"))}
                   for method in methods if method.startswith("fast:")]
        running = {stack: proxies.enter_context(proxy(models, _server_settings(stack))) for stack in stacks}
        print(f"{'method':9} {'server':12} {'streams':>7} {'CPU µs/token':>12} {'CPU ms/answer':>13} "
              f"{'base req/answer':>15} {'base tok/token':>14} {'uncached prompt/answer':>22} "
              f"{'answers/s':>9} {'TTFT p50 s':>10}")
        for concurrency in levels:
            for method in methods:
                for stack, (url, pid) in running.items():
                    figures = _measure(url, pid, base, method, concurrency, args)
                    print(f"{method:9} {stack:12} {concurrency:7} {figures}", flush=True)


if __name__ == "__main__":
    main()
