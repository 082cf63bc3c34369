"""Wall time and upstream requests of `paper`, `fast` and `base_only` on the simulator pair.

Starts two simulators (base, aligned) with their fixed latency model and a proxy, sends the
same chat requests through the proxy for each method, and prints means and ratios. Each
nudged answer's token count is the budget of its `base_only` twin, so `base_only` is the
limit: the base model alone writing as many tokens. Repeats the run for per-request
overheads of 1, 3 (the default) and 10 ms. Then, at the default overhead, one request
where the base loops confidently: the paper's own prompt layout for "List three colors of the
rainbow.", γ 0.3, `max_tokens` 4000, where `paper`'s chunk guards end the base's continuation.
Prints figures; asserts nothing.

    python benchmarks/strategies.py [--requests 10] [--max-tokens 200] [--concurrency 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

QUESTIONS = [
    "Why do leaves change color in autumn?",
    "How does a refrigerator keep food cold?",
    "What causes the seasons on Earth?",
    "Explain how vaccines train the immune system.",
    "Why is the ocean salty?",
    "How do airplanes stay in the air?",
    "What is the difference between weather and climate?",
    "How does compound interest work?",
    "Why do we need sleep?",
    "How do bees make honey?",
    "What makes a good night's sleep routine?",
    "How do solar panels produce electricity?",
]
OVERHEADS_MS = (1.0, 3.0, 10.0)
# The paper's layouts of a reasoning question: plain for the base, chatml for the nudger.
LOOPING_SYSTEM = "Answer the question by walking through the reasoning steps."
LOOPING_QUESTION = "List three colors of the rainbow."
LOOPING_BUDGET = 4000


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait(url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _config(base_port: int, aligned_port: int) -> dict[str, Any]:
    base = {"url": f"http://127.0.0.1:{base_port}/v1", "model": "base"}
    aligned = {"url": f"http://127.0.0.1:{aligned_port}/v1", "model": "aligned", "chat_template": "chatml"}
    return {"models": [
        {"name": "fast", "method": "nudging", "base": base, "nudging": aligned, "strategy": "fast"},
        {"name": "paper", "method": "nudging", "base": base, "nudging": aligned, "strategy": "paper"},
        {"name": "base_only", "method": "base_only", "base": base},
    ]}


async def _one(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> dict[str, Any]:
    started = time.perf_counter()
    response = await client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}],
        "nudging": {"return_provenance": True},
    })
    response.raise_for_status()
    body = response.json()
    report = body["choices"][0].get("nudging") or {}
    requests = sum(report.get("upstream_requests", {}).values()) if report else 1
    return {"wall": time.perf_counter() - started, "requests": requests,
            "tokens": body["usage"]["completion_tokens"], "held": report.get("held_tokens", 0)}


async def _run_method(proxy: str, model: str, budgets: list[int], questions: list[str],
                      concurrency: int) -> list[dict[str, Any]]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=proxy, timeout=600) as client:
        async def bounded(question: str, budget: int) -> dict[str, Any]:
            async with limit:
                return await _one(client, model, question, budget)
        return list(await asyncio.gather(*(bounded(q, b) for q, b in zip(questions, budgets, strict=True))))


def _summary(name: str, results: list[dict[str, Any]]) -> tuple[str, float]:
    wall = statistics.mean(r["wall"] for r in results)
    requests = statistics.mean(r["requests"] for r in results)
    tokens = statistics.mean(r["tokens"] for r in results)
    held = statistics.mean(r["held"] for r in results)
    return (f"  {name:<10} mean wall {wall:7.2f} s   upstream requests {requests:6.1f}   tokens {tokens:6.1f}"
            f"   held tokens {held:5.1f}"), wall


async def _looping(proxy: str) -> None:
    """The base loops: each strategy's time, tokens and ending on one long request."""
    base_prompt = f"{LOOPING_SYSTEM}\nQuestion: {LOOPING_QUESTION}\n"
    nudging_prompt = (f"<|im_start|>system\n{LOOPING_SYSTEM}<|im_end|>\n<|im_start|>user\n"
                      f"Question: {LOOPING_QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    print(f"a looping base: {LOOPING_QUESTION!r} in the paper's layout, threshold 0.3, "
          f"max_tokens {LOOPING_BUDGET}:")
    async with httpx.AsyncClient(base_url=proxy, timeout=600) as client:
        for model in ("paper", "fast", "base_only"):
            started = time.perf_counter()
            body: dict[str, Any] = {"model": model, "prompt": base_prompt, "max_tokens": LOOPING_BUDGET}
            if model != "base_only":
                body["nudging"] = {
                    "threshold": 0.3,
                    "nudging_prompt": nudging_prompt,
                    "return_provenance": True,
                }
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            choice = answer["choices"][0]
            report = choice.get("nudging") or {}
            print(f"  {model:<10} wall {time.perf_counter() - started:7.2f} s   tokens "
                  f"{answer['usage']['completion_tokens']:5}   characters {len(choice['text']):6}   "
                  f"finish {choice['finish_reason']:<6}   held tokens {report.get('held_tokens', 0)}",
                  flush=True)


async def _measure(proxy: str, args: argparse.Namespace) -> dict[str, float]:
    questions = QUESTIONS[: args.requests]
    walls: dict[str, float] = {}
    fast = await _run_method(proxy, "fast", [args.max_tokens] * len(questions), questions, args.concurrency)
    budgets = [r["tokens"] for r in fast]
    paper = await _run_method(proxy, "paper", [args.max_tokens] * len(questions), questions, args.concurrency)
    base = await _run_method(proxy, "base_only", budgets, questions, args.concurrency)
    for name, results in (("paper", paper), ("fast", fast), ("base_only", base)):
        line, walls[name] = _summary(name, results)
        print(line)
    print(f"  fast / base_only = {walls['fast'] / walls['base_only']:.2f}x   "
          f"paper / fast = {walls['paper'] / walls['fast']:.2f}x", flush=True)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10,
                        help="requests in flight at once (the simulators share decode steps like vLLM)")
    parser.add_argument("--time-scale", type=float, default=1.0)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "cli"]
    print(f"{args.requests} chat requests, max_tokens {args.max_tokens}, concurrency {args.concurrency}, "
          f"time scale {args.time_scale}")
    started = time.monotonic()
    for overhead in OVERHEADS_MS:
        ports = {"base": 18101, "aligned": 18102, "proxy": 18100}
        processes = []
        try:
            for profile in ("base", "aligned"):
                processes.append(
                    _start(
                        [
                            *cli,
                            "simulate",
                            "--port",
                            str(ports[profile]),
                            "--profile",
                            profile,
                            "--time-scale",
                            str(args.time_scale),
                            "--latency",
                            f"request_ms={overhead}",
                        ]
                    )
                )
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as config_file:
                yaml.safe_dump(_config(ports["base"], ports["aligned"]), config_file)
            processes.append(_start([*cli, "serve", "--config", config_file.name, "--host", "127.0.0.1",
                                     "--port", str(ports["proxy"])]))
            for port in ports.values():
                _wait(f"http://127.0.0.1:{port}/health")
            label = " (default)" if overhead == 3.0 else ""
            print(f"per-request overhead {overhead:g} ms{label}:")
            asyncio.run(_measure(f"http://127.0.0.1:{ports['proxy']}", args))
            if overhead == 3.0:
                asyncio.run(_looping(f"http://127.0.0.1:{ports['proxy']}"))
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)
            Path(config_file.name).unlink(missing_ok=True)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
