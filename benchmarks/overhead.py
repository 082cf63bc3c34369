"""The latency the proxy adds to a passthrough request, and the requests/s it serves.

Starts the simulator at zero latency (`--time-scale 0`: every delay the simulated model would
add is gone, so what remains is HTTP, JSON and the proxy's own work) and the proxy with a
`base_only` model, each in its own process. Sends the same completions requests to the
simulator directly and through the proxy, one at a time and 32 at a time, and prints latency
percentiles and throughput. The client runs on the same cores as both servers. Prints
figures; asserts nothing.

    python benchmarks/overhead.py [--requests 300] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import httpx
from processes import percentile, proxy, simulator

PROMPT = "The history of the printing press begins"
CONCURRENCY = (1, 32)


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


async def _load(url: str, model: str, requests: int, concurrency: int, max_tokens: int,
                stream: bool) -> tuple[list[float], int, float]:
    """Latencies of `requests` requests, `concurrency` at a time, failures, and the wall time."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(_one(client, model, max_tokens, stream) for _ in range(concurrency * 2)))
        latencies: list[float] = []
        failures = 0

        async def worker(count: int) -> None:
            nonlocal failures
            for _ in range(count):
                latency = await _one(client, model, max_tokens, stream)
                if latency is None:
                    failures += 1
                else:
                    latencies.append(latency)

        started = time.perf_counter()
        share, rest = divmod(requests, concurrency)
        await asyncio.gather(*(worker(share + (i < rest)) for i in range(concurrency)))
        return latencies, failures, time.perf_counter() - started


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f}"


async def _measure(direct: str, proxied: str, args: argparse.Namespace) -> None:
    print("mode        conc   direct p50/p99 ms    proxy p50/p99 ms    added p50/p99 ms"
          "    direct req/s  proxy req/s  failed (direct/proxy)")
    for stream in (False, True):
        for concurrency in CONCURRENCY:
            requests = args.requests * (4 if concurrency > 1 else 1)
            d, d_failed, d_wall = await _load(direct, "base", requests, concurrency, args.max_tokens, stream)
            p, p_failed, p_wall = await _load(proxied, "passthrough", requests, concurrency, args.max_tokens,
                                              stream)
            d50, d99 = percentile(d, 0.5), percentile(d, 0.99)
            p50, p99 = percentile(p, 0.5), percentile(p, 0.99)
            print(f"{'stream' if stream else 'json':<10} {concurrency:>5}   {_ms(d50)} {_ms(d99)}    "
                  f"{_ms(p50)} {_ms(p99)}    {_ms(p50 - d50)} {_ms(p99 - d99)}    "
                  f"{len(d) / d_wall:11.0f}  {len(p) / p_wall:11.0f}  {d_failed}/{p_failed}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300, help="per run at concurrency 1 (x4 at 32)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    print(f"completions, max_tokens {args.max_tokens}, simulator at zero latency, base_only passthrough")
    with simulator("base", time_scale=0) as direct:
        models = [{"name": "passthrough", "method": "base_only",
                   "base": {"url": direct + "/v1", "model": "base", "dialect": "nudging-proxy"}}]
        with proxy(models) as (proxied, _):
            asyncio.run(_measure(direct, proxied, args))


if __name__ == "__main__":
    main()
