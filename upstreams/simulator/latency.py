"""How long the simulated server takes: a fixed, documented latency model.

Per request: ``request_ms`` of overhead (HTTP, scheduling, detokenisation), then a prefill of
``prefill_ms`` per *uncached* prompt token, then ``decode_ms`` per generated token, the first
token included (even a fully cached prompt needs one forward pass).

Prefix cache: like vLLM's automatic prefix caching, prompts are cached in blocks of
``block_tokens`` tokens chained by their prefix; a prompt's cached part is its longest prefix of
whole blocks seen before (at most all but its last token, since the model must compute one
position to produce logits). Prompt and generated tokens of finished requests are added, and
the least recently used blocks are evicted beyond ``cache_tokens``.

Concurrency: a vLLM engine batches all running requests into each decode step, so a decode
step costs the same whether it serves one request or many. The simulator models this by
letting every request sleep on its own schedule: concurrent requests overlap completely and
per-token time does not grow with concurrency. (It is an idealisation: real prefills also
delay the decode steps of the other requests, and large batches get somewhat slower.)

The defaults are fixed per profile so that nobody tunes them to a target:
``base`` (a 70B-class model on 4 GPUs) 30 ms per token, 0.3 ms per uncached prompt token;
``aligned`` and ``aligned-base`` (7B-class, one GPU) 8 ms and 0.05 ms; 3 ms per request.
A time scale multiplies every delay (0 removes them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class LatencyModel:
    request_ms: float
    prefill_ms: float  # per uncached prompt token
    decode_ms: float  # per generated token
    block_tokens: int = 16
    cache_tokens: int = 262_144

    @classmethod
    def for_profile(cls, profile: str) -> LatencyModel:
        try:
            return PROFILE_DEFAULTS[profile]
        except KeyError:
            raise ValueError(f"unknown profile {profile!r}") from None

    def with_overrides(self, spec: str) -> LatencyModel:
        """Apply ``"request_ms=10,decode_ms=30,prefill_ms=0.3"`` (any subset, any order)."""
        names = {f.name: f.type for f in dataclasses.fields(self)}
        changes: dict[str, float | int] = {}
        for item in spec.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in names:
                raise ValueError(
                    f"bad latency setting {item!r}; expected name=value with name one of "
                    + ", ".join(names)
                )
            try:
                number = int(value) if name in ("block_tokens", "cache_tokens") else float(value)
            except ValueError:
                raise ValueError(f"bad number in latency setting {item!r}") from None
            if number < 0 or (name == "block_tokens" and number < 1):
                raise ValueError(f"latency setting {item!r} is out of range")
            changes[name] = number
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def describe(self) -> str:
        return (f"request_ms={self.request_ms:g},prefill_ms={self.prefill_ms:g},"
                f"decode_ms={self.decode_ms:g},block_tokens={self.block_tokens},"
                f"cache_tokens={self.cache_tokens}")


PROFILE_DEFAULTS: Final[dict[str, LatencyModel]] = {
    "base": LatencyModel(request_ms=3.0, prefill_ms=0.3, decode_ms=30.0),
    "aligned": LatencyModel(request_ms=3.0, prefill_ms=0.05, decode_ms=8.0),
    "aligned-base": LatencyModel(request_ms=3.0, prefill_ms=0.05, decode_ms=8.0),
}


class PrefixCache:
    """Token blocks of recent prompts, keyed by their whole prefix, least recently used out.

    Block keys chain Python's hash of the tokens; they live only in this process's memory,
    where a collision (odds ~2^-64 per pair) would at worst misprice one prefill.
    """

    def __init__(self, block_tokens: int, capacity_tokens: int) -> None:
        self._block = block_tokens
        self._capacity = max(1, capacity_tokens // block_tokens)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def _keys(self, tokens: list[str]) -> list[int]:
        keys: list[int] = []
        key = 0
        for end in range(self._block, len(tokens) + 1, self._block):
            key = hash((key, tuple(tokens[end - self._block : end])))
            keys.append(key)
        return keys

    def cached_tokens(self, tokens: list[str]) -> int:
        """Tokens of `tokens` whose computation the cache saves (and mark them as used)."""
        hits = 0
        for key in self._keys(tokens):
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            hits += 1
        return min(hits * self._block, max(len(tokens) - 1, 0))

    def add(self, tokens: list[str]) -> None:
        for key in self._keys(tokens):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class Schedule:
    """The times at which one request's tokens are due, as sleeps that do not drift."""

    def __init__(self, model: LatencyModel, time_scale: float, uncached_tokens: int) -> None:
        self._scale = time_scale / 1000.0  # milliseconds to seconds
        self._model = model
        self._due = time.monotonic() + self._scale * (
            model.request_ms + model.prefill_ms * uncached_tokens
        )

    async def until_prefilled(self) -> None:
        await self._sleep()

    async def next_token(self) -> None:
        self._due += self._scale * self._model.decode_ms
        await self._sleep()

    async def _sleep(self) -> None:
        # Sleeping until a deadline (not for a duration) keeps the simulator's own compute
        # time out of the modelled latency. Even without delay, yield to the event loop so
        # that other requests and client disconnects are served.
        delay = self._due - time.monotonic() if self._scale > 0 else 0.0
        await asyncio.sleep(max(delay, 0.0))
