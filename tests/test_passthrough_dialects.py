"""A passthrough model over each dialect keeps the upstream's whole text (real HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nudging_core.calls import derive_seed
from nudging_core.generation import Generation, GenerationRequest
from nudging_core.methods import Method
from nudging_core.types import Role, SamplingParams
from nudging_core.upstream import UpstreamClient

from .scripted import ScriptedUpstream
from .servers import running

FIXTURES = Path(__file__).parent / "fixtures" / "dialects"


def llama_server() -> Starlette:
    async def completion(request: Request) -> Response:
        assert (await request.json())["stream"] is True
        return Response((FIXTURES / "llama_server_stream.txt").read_text(), media_type="text/event-stream")

    return Starlette(routes=[
        Route("/v1/models", lambda request: JSONResponse({"data": [{"id": "m", "owned_by": "llamacpp"}]})),
        Route("/completion", completion, methods=["POST"]),
    ])


async def test_base_only_over_llama_server_keeps_its_text() -> None:
    with running(llama_server()) as url:
        client = UpstreamClient(url + "/v1", "m", role="base")
        generation = Generation(
            GenerationRequest(method="base_only", max_tokens=5, base_prompt="The capital of France is"),
            {"base": client},
        )
        try:
            text = "".join([piece.text async for piece in generation.pieces()])
        finally:
            await client.aclose()
    # The stream's three tokens: " Paris", then "é" split over two.
    assert text == " Parisé"
    assert generation.completion_tokens == 3


@pytest.mark.parametrize("method", ["base_only", "nudging_only"])
async def test_passthrough_sends_the_client_s_seed(method: Method) -> None:
    # A sampled passthrough answer must be the one the upstream gives for the client's seed;
    # further choices need seeds of their own, or they would all be the same answer.
    upstream = ScriptedUpstream()
    upstream.add("Hi", [(" there", 0.5), ("!", 0.5)])
    role: Role = "base" if method == "base_only" else "nudging"
    sent = []
    with running(upstream.app()) as url:
        client = UpstreamClient(url + "/v1", "scripted", role=role)
        try:
            for choice in (0, 1):
                request = GenerationRequest(
                    method=method, max_tokens=4, base_prompt="Hi", nudging_prompt="Hi", choice_index=choice,
                    sampling=SamplingParams(temperature=1.0, seed=42))
                generation = Generation(request, {role: client})
                assert "".join([piece.text async for piece in generation.pieces()]) == " there!"
                sent.append(upstream.requests[-1]["seed"])
        finally:
            await client.aclose()
    assert sent == [42, derive_seed(42, 1, 0, role)]
