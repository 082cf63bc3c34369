"""Run one nudging generation against two scripted upstreams in this process
(`nudging_core.upstream.MemoryUpstream`: no sockets)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.nudging import NudgingParams
from nudging_core.types import GenerationStats, Piece, Role, SamplingParams
from nudging_core.upstream import Upstream

BASE_PROMPT = "Q\n"
NUDGING_PROMPT = "<user>Q<assistant>"


@dataclass
class Outcome:
    text: str
    pieces: list[Piece]
    stats: GenerationStats
    finish_reason: str
    completion_tokens: int


async def run_nudging(
    upstreams: Mapping[Role, Upstream], max_tokens: int = 200, stop: tuple[str, ...] = (),
    sampling: SamplingParams | None = None, **params: object,
) -> Outcome:
    """One nudging generation of `BASE_PROMPT` / `NUDGING_PROMPT` on `upstreams`."""
    request = GenerationRequest(
        method="nudging",
        max_tokens=max_tokens,
        base_prompt=BASE_PROMPT,
        nudging_prompt=NUDGING_PROMPT,
        stop=stop,
        sampling=sampling or SamplingParams(),
        params=NudgingParams(**params),  # type: ignore[arg-type]
    )
    generation = Generation(request, upstreams)
    try:
        pieces = [piece async for piece in generation.pieces()]
    finally:
        for upstream in upstreams.values():
            await upstream.aclose()
    return Outcome(
        "".join(p.text for p in pieces), pieces, generation.stats, generation.finish_reason,
        generation.completion_tokens,
    )
