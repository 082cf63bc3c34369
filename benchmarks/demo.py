"""Wall time, upstream work and nudging share of the `demo` stack on the real CPU models.

Starts ``nudging-proxy demo`` (Gemma 3 270M base nudged by SmolLM2-135M-Instruct, one
llama.cpp thread per model) on free ports with a copy of configs/demo.yaml, then sends the
same chat prompts one at a time, greedy, for `base_only` (gemma-base), `nudging` with strategy
`fast` and `nudging` with strategy `paper` (gemma-nudged). Before each method both upstreams'
``/stats`` are reset, so their counters (tokens generated, prompt tokens evaluated or reused
from the KV cache, requests, cancellations) are that method's alone. Prints figures against
the targets (fast within 1.5x of base_only; a 128-token nudged answer in under 5 s on 2
cores); asserts nothing.

    python benchmarks/demo.py [--requests 10] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Why is the sky blue?",
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "How do airplanes fly?",
    "What is photosynthesis?",
    "Write a short poem about the sea.",
    "Explain what a computer is to a child.",
    "What are the benefits of reading books?",
    "How do I make a cup of tea?",
    "Why do cats purr?",
    "What is the difference between weather and climate?",
    "Name some famous painters.",
]
# name, served model, nudging strategy
METHODS = (("base_only", "gemma-base", None), ("fast", "gemma-nudged", "fast"),
           ("paper", "gemma-nudged", "paper"))
FAST_TARGET = 1.5  # fast / base_only
ANSWER_TARGET_S = 5.0  # a 128-token nudged answer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(base_port: int, nudger_port: int) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    ports = {"gemma": base_port, "smollm": nudger_port}
    for model in config["models"]:
        for role in ("base", "nudging"):
            if role in model:
                model[role]["url"] = f"http://127.0.0.1:{ports[model[role]['model']]}/v1"
    return config


def _wait_ready(proxy: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for endpoint in ("/health", "/ready"):
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the demo exited with code {process.returncode}:\n"
                                 f"{log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the demo's {endpoint} did not answer in {timeout:.0f} s")
            try:
                if httpx.get(proxy + endpoint, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)


def _ask(client: httpx.Client, model: str, strategy: str | None, question: str,
         max_tokens: int) -> dict[str, Any]:
    nudging: dict[str, Any] = {"return_provenance": True}
    if strategy is not None:
        nudging["strategy"] = strategy
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": question}], "nudging": nudging})
    wall = time.perf_counter() - started
    response.raise_for_status()
    body = response.json()
    report = body["choices"][0].get("nudging") or {}
    return {"wall": wall, "tokens": body["usage"]["completion_tokens"],
            "requests": sum(report.get("upstream_requests", {}).values()) or 1,
            "ratio": report.get("nudging_word_ratio"), "stop": report.get("stop_reason")}


def _stats(url: str, reset: bool = False) -> dict[str, int]:
    if reset:
        response = httpx.post(url + "/stats/reset", timeout=30)
    else:
        response = httpx.get(url + "/stats", timeout=30)
    response.raise_for_status()
    return dict(response.json())


def _run(proxy: str, upstreams: dict[str, str], questions: list[str],
         max_tokens: int) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=proxy, timeout=900) as client:
        for name, model, strategy in METHODS:
            for url in upstreams.values():
                _stats(url, reset=True)
            started = time.perf_counter()
            answers = []
            for question in questions:
                answers.append(_ask(client, model, strategy, question, max_tokens))
                print(f"  {name:9} {answers[-1]['wall']:6.2f} s {answers[-1]['tokens']:4d} tokens "
                      f"{answers[-1]['requests']:4d} requests  {question}", flush=True)
            wall = time.perf_counter() - started
            results[name] = {"answers": answers, "wall": wall,
                             "stats": {role: _stats(url) for role, url in upstreams.items()}}
    return results


def _report(results: dict[str, dict[str, Any]], max_tokens: int) -> None:
    print(f"\n{'method':10} {'median s':>8} {'mean s':>7} {'s/token':>8} {'tokens':>6} "
          f"{'requests':>8} {'ratio mean':>10} {'median':>6}  stop reasons")
    medians: dict[str, float] = {}
    per_token: dict[str, float] = {}
    for name, result in results.items():
        answers = result["answers"]
        walls = [a["wall"] for a in answers]
        tokens = sum(a["tokens"] for a in answers)
        medians[name] = statistics.median(walls)
        per_token[name] = sum(walls) / tokens
        ratios = [a["ratio"] for a in answers if a["ratio"] is not None]
        ratio = (f"{statistics.mean(ratios):10.2f} {statistics.median(ratios):6.2f}"
                 if name != "base_only" and ratios else f"{'-':>10} {'-':>6}")
        stops: dict[str, int] = {}
        for answer in answers:
            stops[answer["stop"]] = stops.get(answer["stop"], 0) + 1
        print(f"{name:10} {medians[name]:8.2f} {statistics.mean(walls):7.2f} "
              f"{per_token[name]:8.3f} {tokens / len(answers):6.1f} "
              f"{statistics.mean(a['requests'] for a in answers):8.1f} {ratio}  "
              + ", ".join(f"{k} {v}" for k, v in sorted(stops.items())))

    print("\nlocal upstreams, per method (counters reset before each; tokens/s = tokens "
          "generated / the method's wall time, idle time included)")
    print(f"{'method':10} {'role':7} {'generated':>9} {'tokens/s':>8} {'per answer token':>16} "
          f"{'prompt evaluated':>16} {'reused':>7} {'reused %':>8} {'requests':>8} {'cancelled':>9}")
    for name, result in results.items():
        answer_tokens = sum(a["tokens"] for a in result["answers"])
        for role, stats in result["stats"].items():
            if not stats["requests_total"]:
                continue
            seen = stats["prompt_tokens_evaluated"] + stats["prompt_tokens_reused"]
            print(f"{name:10} {role:7} {stats['tokens_generated']:9d} "
                  f"{stats['tokens_generated'] / result['wall']:8.1f} "
                  f"{stats['tokens_generated'] / answer_tokens:16.2f} "
                  f"{stats['prompt_tokens_evaluated']:16d} {stats['prompt_tokens_reused']:7d} "
                  f"{100 * stats['prompt_tokens_reused'] / max(seen, 1):7.1f}% "
                  f"{stats['requests_total']:8d} {stats['requests_cancelled']:9d}")
    base = results["base_only"]
    decode = sum(a["tokens"] for a in base["answers"]) / sum(a["wall"] for a in base["answers"])
    print(f"\nGemma alone (base_only: completion tokens / wall, proxy included): {decode:.1f} tokens/s")

    fast_ratio = medians["fast"] / medians["base_only"]
    fast_ratio_token = per_token["fast"] / per_token["base_only"]
    print(f"fast / base_only: {fast_ratio:.2f}x median wall, {fast_ratio_token:.2f}x per token "
          f"(target <= {FAST_TARGET}x: {'met' if fast_ratio_token <= FAST_TARGET else 'NOT met'})")
    print(f"paper / fast:     {medians['paper'] / medians['fast']:.2f}x median wall, "
          f"{per_token['paper'] / per_token['fast']:.2f}x per token")
    full = [a["wall"] for a in results["fast"]["answers"] if a["tokens"] == max_tokens]
    per_128 = 128 * per_token["fast"]
    full_text = (f"median {statistics.median(full):.2f} s over the {len(full)} answers that used "
                 f"all {max_tokens} tokens" if full else f"no answer used all {max_tokens} tokens")
    print(f"fast, a 128-token answer: {per_128:.2f} s at its mean s/token; {full_text} "
          f"(target < {ANSWER_TARGET_S:g} s: {'met' if per_128 < ANSWER_TARGET_S else 'NOT met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    questions = QUESTIONS[: args.requests]
    proxy_port, base_port, nudger_port = _free_port(), _free_port(), _free_port()
    directory = Path(tempfile.mkdtemp(prefix="demo-bench-"))
    config = directory / "demo.yaml"
    config.write_text(yaml.safe_dump(_config(base_port, nudger_port)))
    log = directory / "demo.log"
    print(f"{len(questions)} chat requests one at a time, max_tokens {args.max_tokens}, greedy; "
          f"demo on port {proxy_port}, 1 thread per model, log {log}", flush=True)
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "demo", "--config", str(config),
             "--port", str(proxy_port), "--threads", "1"],
            cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    try:
        proxy = f"http://127.0.0.1:{proxy_port}"
        _wait_ready(proxy, process, log)
        print(f"stack ready in {time.monotonic() - started:.1f} s", flush=True)
        upstreams = {"base": f"http://127.0.0.1:{base_port}",
                     "nudger": f"http://127.0.0.1:{nudger_port}"}
        _report(_run(proxy, upstreams, questions, args.max_tokens), args.max_tokens)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
