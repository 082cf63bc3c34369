"""HTTP routes: thin glue from the protocol models to the core's generations."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nudging_core.upstream import UpstreamError

from .errors import model_not_found, upstream_failure
from .prompts import Prompts, chat_prompts, completion_prompts
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .registry import ModelRegistry, ServedModel
from .responses import Shape
from .runs import AnyRequest, generation_requests, make_runs, run_choices
from .streaming import stream_response

router = APIRouter()


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def _served(request: Request, name: str) -> ServedModel:
    served = _registry(request).get(name)
    if served is None:
        raise model_not_found(name)
    return served


async def _respond(served: ServedModel, body: AnyRequest, prompts: Prompts, *, chat: bool) -> Response:
    requests = generation_requests(served, body, prompts)
    runs = make_runs(served, requests)
    with_provenance = bool(body.nudging and body.nudging.return_provenance)
    shape = Shape(chat=chat, model=body.model, with_provenance=with_provenance)
    events = run_choices(runs)
    try:
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream_response(shape, runs, events, include_usage)
        async with aclosing(events):
            async for _ in events:
                pass
    except UpstreamError as error:
        raise upstream_failure(error) from None
    return JSONResponse(shape.body(runs))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    served = _served(request, body.model)
    return await _respond(served, body, await completion_prompts(served, body), chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    served = _served(request, body.model)
    return await _respond(served, body, await chat_prompts(served, body), chat=True)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    created = request.app.state.started
    cards = [ModelCard(id=name, created=created) for name in _registry(request).models]
    return ModelList(data=cards).model_dump()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    upstreams = await _registry(request).readiness()
    is_ready = all(upstreams.values())
    return JSONResponse(
        {"status": "ready" if is_ready else "not ready", "upstreams": upstreams},
        status_code=200 if is_ready else 503,
    )
