"""Run one nudging generation against two scripted upstreams over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.nudging import NudgingParams
from nudging_core.types import GenerationStats, Piece
from nudging_core.upstream import UpstreamClient

from .scripted import ScriptedUpstream
from .servers import running

BASE_PROMPT = "Q\n"
NUDGING_PROMPT = "<user>Q<assistant>"


@dataclass
class Outcome:
    text: str
    pieces: list[Piece]
    stats: GenerationStats
    finish_reason: str
    completion_tokens: int


@dataclass
class Pair:
    base: ScriptedUpstream
    nudger: ScriptedUpstream
    base_url: str
    nudger_url: str

    async def run(self, max_tokens: int = 200, stop: tuple[str, ...] = (), **params: object) -> Outcome:
        clients = {
            "base": UpstreamClient(self.base_url + "/v1", "scripted", role="base"),
            "nudging": UpstreamClient(self.nudger_url + "/v1", "scripted", role="nudging"),
        }
        request = GenerationRequest(
            method="nudging",
            max_tokens=max_tokens,
            base_prompt=BASE_PROMPT,
            nudging_prompt=NUDGING_PROMPT,
            stop=stop,
            params=NudgingParams(**params),  # type: ignore[arg-type]
        )
        generation = Generation(request, clients)  # type: ignore[arg-type]
        try:
            pieces = [piece async for piece in generation.pieces()]
        finally:
            for client in clients.values():
                await client.aclose()
        return Outcome(
            "".join(p.text for p in pieces), pieces, generation.stats, generation.finish_reason,
            generation.completion_tokens,
        )


@contextmanager
def scripted_pair() -> Iterator[Pair]:
    base, nudger = ScriptedUpstream("base"), ScriptedUpstream("nudger")
    with ExitStack() as stack:
        base_url = stack.enter_context(running(base.app()))
        nudger_url = stack.enter_context(running(nudger.app()))
        yield Pair(base, nudger, base_url, nudger_url)
