"""HTTP routes: thin glue from the protocol models to the core's generations."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nudging_core.upstream import UpstreamError

from .errors import model_not_found, upstream_failure
from .limits import check_limits
from .observability import note_model, observed
from .prompts import Prompts, chat_prompts, completion_prompts
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .registry import ModelRegistry, ServedModel
from .responses import Shape
from .runs import AnyRequest, RecoveryPolicy, generation_requests, make_runs, run_choices
from .streaming import stream_response

router = APIRouter()


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def _served(request: Request, body: AnyRequest) -> ServedModel:
    """The model a request within the input limits names."""
    check_limits(body, request.app.state.limits)
    served = _registry(request).get(body.model)
    if served is None:
        raise model_not_found(body.model)
    note_model(body.model)
    return served


async def _until_disconnected(request: Request) -> None:
    # The body has been read, so the next message the server has for us is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, answer: Coroutine[Any, Any, Response]) -> Response:
    """`answer`, cancelled with every upstream request it made as soon as the client leaves.

    The server would finish a handler for nobody; a stream is watched until it starts, after
    which the streaming response stops when its client goes.
    """
    answering = asyncio.ensure_future(answer)
    leaving = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        answering.cancel()
        await asyncio.gather(answering, leaving, return_exceptions=True)
    if answering.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return answering.result()


async def _respond(
    served: ServedModel, body: AnyRequest, make_prompts: Callable[[], Awaitable[Prompts]], *, chat: bool
) -> Response:
    prompts = await make_prompts()
    requests = generation_requests(served, body, prompts)
    runs = make_runs(served, requests)
    with_provenance = bool(body.nudging and body.nudging.return_provenance)
    shape = Shape(chat=chat, model=body.model, with_provenance=with_provenance,
                  top_logprobs=(getattr(body, "top_logprobs", None) or 0) if chat else 0)
    policy = RecoveryPolicy(served, streaming=bool(body.stream))
    events = observed(run_choices(runs, policy), nudged=served.config.method == "nudging", stream=body.stream)
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
    served = _served(request, body)
    answer = _respond(served, body, lambda: completion_prompts(served, body), chat=False)
    return await _unless_client_leaves(request, answer)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    served = _served(request, body)
    answer = _respond(served, body, lambda: chat_prompts(served, body), chat=True)
    return await _unless_client_leaves(request, answer)


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
    registry = _registry(request)
    upstreams, templates = await asyncio.gather(registry.readiness(), registry.template_problems())
    is_ready = all(upstreams.values()) and not templates
    body: dict[str, Any] = {"status": "ready" if is_ready else "not ready", "upstreams": upstreams}
    if templates:
        body["chat_template"] = templates
    return JSONResponse(body, status_code=200 if is_ready else 503)
