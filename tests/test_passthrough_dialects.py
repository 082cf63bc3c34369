"""A passthrough model over each dialect keeps the upstream's whole text (real HTTP)."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nudging_core.generation import Generation, GenerationRequest
from nudging_core.upstream import UpstreamClient

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
