"""The latency the proxy adds to a passthrough request, and the requests/s it serves, side by
side with LiteLLM's proxy when that is installed.

Starts the simulator at zero latency (`--time-scale 0`: every delay the simulated model would
add is gone, so what remains is HTTP, JSON and the proxy's own work), the proxy with a
`base_only` model (once per `--workers` count), and LiteLLM's proxy (one worker) on the same
simulator if the Python at `--litellm-python` has it (`pip install litellm[proxy]`, our
`bench` extra); each in its own process. Sends the same completions requests to the simulator
directly and through each proxy, one at a time and 32 at a time, the targets taking turns
(`--rounds`) so that a change in the machine's load falls on all of them alike, and prints
latency percentiles, the latency each proxy adds, throughput, and LiteLLM's added p50 over
ours. The client runs on the same cores as the servers. Prints figures; asserts nothing.

    python benchmarks/overhead.py [--requests 300] [--max-tokens 16] [--workers 1,2]
                                  [--litellm-python PATH] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import httpx
from processes import has_litellm_proxy, litellm_proxy, percentile, proxy, simulator

PROMPT = "The history of the printing press begins"
CONCURRENCY = (1, 32)
DIRECT = "direct"
LITELLM = "litellm"


@dataclass
class Target:
    name: str
    url: str
    model: str


@dataclass
class Run:
    """One target's requests at one concurrency, over all its turns."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    seconds: float = 0.0

    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    def per_second(self) -> float:
        return len(self.latencies) / self.seconds


async def _one(client: httpx.AsyncClient, model: str, max_tokens: int, stream: bool) -> float | None:
    """The request's latency, or None if it failed."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": stream}
    started = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for _ in response.aiter_lines():
                    pass
        else:
            (await client.post("/v1/completions", json=body)).raise_for_status()
    except httpx.HTTPError:
        return None
    return time.perf_counter() - started


async def _load(target: Target, run: Run, requests: int, concurrency: int, max_tokens: int,
                stream: bool) -> None:
    """`requests` requests, `concurrency` at a time (after a warm-up), added to `run`."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=target.url, timeout=60, limits=limits) as client:
        warm_up = (_one(client, target.model, max_tokens, stream) for _ in range(concurrency * 2))
        await asyncio.gather(*warm_up)

        async def worker(count: int) -> None:
            for _ in range(count):
                latency = await _one(client, target.model, max_tokens, stream)
                if latency is None:
                    run.failures += 1
                else:
                    run.latencies.append(latency)

        started = time.perf_counter()
        share, rest = divmod(requests, concurrency)
        await asyncio.gather(*(worker(share + (i < rest)) for i in range(concurrency)))
        run.seconds += time.perf_counter() - started


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def _report(mode: str, concurrency: int, runs: dict[str, Run]) -> None:
    direct = runs[DIRECT]
    for name, run in runs.items():
        added = "" if name == DIRECT else f"{_ms(run.p50() - direct.p50())} {_ms(run.p99() - direct.p99())}"
        print(f"{mode:<7} {concurrency:>4}  {name:<12} {_ms(run.p50())} {_ms(run.p99())}   {added:<17}"
              f"   {run.per_second():8.0f}  {run.failures:>6}", flush=True)
    if LITELLM in runs:
        litellm = runs[LITELLM].p50() - direct.p50()
        for name, run in runs.items():
            ours = run.p50() - direct.p50()
            if name not in (DIRECT, LITELLM):
                # Noise can put a proxy's p50 below the direct one's: no ratio then.
                ratio = f"{litellm / ours:.1f}x" if ours > 0 else "n/a (ours added nothing measurable)"
                print(f"{'':<13} LiteLLM's added p50 / {name}'s: {ratio}")


async def _measure(targets: list[Target], args: argparse.Namespace) -> None:
    print("mode    conc  target         p50 ms   p99 ms   added p50/p99 ms    req/s  failed")
    for stream in (False, True):
        for concurrency in CONCURRENCY:
            requests = args.requests * (4 if concurrency > 1 else 1) // args.rounds
            runs = {target.name: Run() for target in targets}
            for _ in range(args.rounds):
                for target in targets:
                    await _load(target, runs[target.name], requests, concurrency, args.max_tokens, stream)
            _report("stream" if stream else "json", concurrency, runs)


@contextmanager
def _targets(args: argparse.Namespace) -> Iterator[list[Target]]:
    with ExitStack() as stack:
        direct = stack.enter_context(simulator("base", time_scale=0))
        targets = [Target(DIRECT, direct, "base")]
        models = [{"name": "passthrough", "method": "base_only",
                   "base": {"url": direct + "/v1", "model": "base", "dialect": "nudging-proxy"}}]
        for workers in args.workers:
            url, _ = stack.enter_context(proxy(models, {"workers": workers}))
            targets.append(Target(f"proxy x{workers}", url, "passthrough"))
        if has_litellm_proxy(args.litellm_python):
            targets.append(Target(LITELLM, stack.enter_context(
                litellm_proxy(args.litellm_python, "base", direct + "/v1")), "base"))
        else:
            print(f"LiteLLM's proxy is not installed for {args.litellm_python} (pip install "
                  "'litellm[proxy]', the `bench` extra, or give --litellm-python): ours alone")
        yield targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="per target at concurrency 1 (x4 at 32)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workers", default="1", type=lambda text: [int(n) for n in text.split(",")],
                        help="comma-separated worker counts of our proxy, one proxy each")
    parser.add_argument("--litellm-python", default=sys.executable,
                        help="a Python with litellm[proxy] installed (default: this one)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each target takes")
    args = parser.parse_args()
    print(f"completions, max_tokens {args.max_tokens}, simulator at zero latency, base_only passthrough")
    with _targets(args) as targets:
        asyncio.run(_measure(targets, args))


if __name__ == "__main__":
    main()
