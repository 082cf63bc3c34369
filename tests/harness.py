"""Run one nudging generation against two scripted upstreams in this process
(`nudging_core.upstream.MemoryUpstream`: no sockets)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.nudging import NudgingParams
from nudging_core.types import GenerationStats, Piece, Role, SamplingParams, Source
from nudging_core.upstream import Upstream

BASE_PROMPT = "Q\n"
NUDGING_PROMPT = "<user>Q<assistant>"


@dataclass
class NudgingRun:
    text: str
    pieces: list[Piece]
    stats: GenerationStats
    finish_reason: str
    completion_tokens: int

    def logprobs(self) -> tuple[dict[str, list[Any]], list[tuple[Source, float | None]]]:
        """The answer's logprobs (its pieces' joined), and per token who wrote it and the
        base's top-1 probability there."""
        joined: dict[str, list[Any]] = {}
        for piece in self.pieces:
            for key, values in (piece.logprobs or {}).items():
                joined.setdefault(key, []).extend(values)
        sources = [(piece.source, written.base_top_prob)
                   for piece in self.pieces for written in piece.written]
        return joined, sources


async def run_nudging(
    upstreams: Mapping[Role, Upstream], max_tokens: int = 200, stop: tuple[str, ...] = (),
    sampling: SamplingParams | None = None, logprobs: int | None = None, **params: object,
) -> NudgingRun:
    """One nudging generation of `BASE_PROMPT` / `NUDGING_PROMPT` on `upstreams` (with
    `logprobs`, the client's k)."""
    request = GenerationRequest(
        method="nudging",
        max_tokens=max_tokens,
        base_prompt=BASE_PROMPT,
        nudging_prompt=NUDGING_PROMPT,
        stop=stop,
        sampling=sampling or SamplingParams(),
        params=NudgingParams(**params),  # type: ignore[arg-type]
        return_logprobs=logprobs is not None,
        top_logprobs=logprobs or 0,
    )
    generation = Generation(request, upstreams)
    try:
        pieces = [piece async for piece in generation.pieces()]
    finally:
        for upstream in upstreams.values():
            await upstream.aclose()
    return NudgingRun(
        "".join(p.text for p in pieces), pieces, generation.stats, generation.finish_reason,
        generation.completion_tokens,
    )
