"""HTTP routes: thin glue from the protocol models to the core's generations."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nudging_core.errors import invalid_request, model_not_found
from nudging_core.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    parse_request,
    tokenize_request_type,
)
from nudging_core.registry import ModelRegistry, ServedModel
from nudging_core.service import AnyRequest, ChoiceFinished, ChoiceRun, ErrorEvent, UsageEvent, plan, run
from nudging_core.service.tokenizer import TokenizerEndpoint, ask_tokenizer

from .observability import note_model, observed
from .responses import ChatShape, Shape, TextShape
from .streaming import stream_response

router = APIRouter()


def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def _served(request: Request, body: AnyRequest) -> ServedModel:
    """The model a request names."""
    return _named(request, body.model)


def _named(request: Request, name: str) -> ServedModel:
    served = _registry(request).get(name)
    if served is None:
        raise model_not_found(name)
    note_model(name)
    return served


def _tokenizer_model(request: Request, name: str | None) -> ServedModel:
    """The model a tokenizer request names; naming none is fine when there is only one (vLLM's
    `model` is optional there, and lm-eval's remote tokenizer sends none)."""
    if name is None:
        names = list(_registry(request).models)
        if len(names) != 1:
            raise invalid_request("model is required: this server serves several models", "model")
        name = names[0]
    return _named(request, name)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise invalid_request("Could not parse the request body as JSON.") from None


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


async def _respond(request: Request, served: ServedModel, body: AnyRequest, shape: Shape) -> Response:
    """The service's answer to `body`, encoded: an SSE stream or one JSON body."""
    plans = await plan(body, served, request.app.state.limits)
    events = observed(run(plans, streaming=body.stream), nudged=served.config.method == "nudging",
                      stream=body.stream)
    if body.stream:
        return await stream_response(shape, [p.index for p in plans], events,
                                     send_timeout=request.app.state.send_timeout)
    finished: list[ChoiceRun] = []
    usage = UsageEvent(0, 0)
    async with aclosing(events):
        async for event in events:
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, ChoiceFinished):
                finished.append(event.choice)
            elif isinstance(event, UsageEvent):
                usage = event
    return JSONResponse(shape.body(sorted(finished, key=lambda choice: choice.index), usage))


def _with_provenance(body: AnyRequest) -> bool:
    return bool(body.nudging and body.nudging.return_provenance)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    served = _served(request, body)
    shape = TextShape(model=body.model, with_provenance=_with_provenance(body),
                      include_usage=body.include_usage())
    return await _unless_client_leaves(request, _respond(request, served, body, shape))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    served = _served(request, body)
    shape = ChatShape(model=body.model, with_provenance=_with_provenance(body),
                      include_usage=body.include_usage(), top_logprobs=body.top_logprobs or 0)
    return await _unless_client_leaves(request, _respond(request, served, body, shape))


def _card(request: Request, name: str) -> ModelCard:
    return ModelCard(id=name, created=request.app.state.started)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    cards = [_card(request, name) for name in _registry(request).models]
    return ModelList(data=cards).model_dump()


# `:path`: model names such as "org/model" hold slashes, which clients need not escape.
@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    if _registry(request).get(model_id) is None:
        raise model_not_found(model_id)
    return _card(request, model_id).model_dump()


async def _tokenizer_answer(request: Request, name: str | None, endpoint: TokenizerEndpoint,
                            body: dict[str, Any] | None) -> JSONResponse:
    served = _tokenizer_model(request, name)
    return JSONResponse(await ask_tokenizer(served, endpoint, body))


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    raw = await _json_body(request)
    body = parse_request(tokenize_request_type(raw), raw)
    # What the client sent goes on, unknown fields too, for the upstream to judge.
    return await _tokenizer_answer(request, body.model, "tokenize", body.model_dump(exclude_unset=True))


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    body = parse_request(DetokenizeRequest, await _json_body(request))
    return await _tokenizer_answer(request, body.model, "detokenize", body.model_dump(exclude_unset=True))


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> JSONResponse:
    # vLLM's takes no model (it serves one); here `?model=` picks the model.
    return await _tokenizer_answer(request, model, "tokenizer_info", None)


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
