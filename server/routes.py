"""HTTP routes: thin glue from the protocol models to the core's generations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Coroutine
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from nudging_core.admission import holding
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
from nudging_core.service import (
    AnyRequest,
    ChoiceFinished,
    ChoicePlan,
    ChoiceRun,
    ErrorEvent,
    Event,
    UsageEvent,
    check,
    render_plans,
    run,
)
from nudging_core.service.chat import ChatForward, answer_chat, chat_forward, stream_chat
from nudging_core.service.tokenizer import TokenizerEndpoint, ask_tokenizer

from .admission import admit
from .observability import note_forwarded_answer, note_model, observed, observed_forward
from .responses import ChatShape, Shape, TextShape
from .streaming import forwarded_stream_response, stream_response

router = APIRouter()
READY_CACHE_SECONDS = 1.0


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
    """The service's answer to `body`, encoded: an SSE stream or one JSON body. A valid request
    waits for its model's admission (or gets its 429) before any upstream request: rendering
    its prompts may ask the upstream too."""
    checked = check(body, served, request.app.state.limits)
    ticket = await admit(request.app.state.metrics, served.admission)
    try:
        plans = await render_plans(body, served, checked)
        events = observed(holding(ticket, run(plans, streaming=body.stream)),
                          nudged=served.config.method == "nudging", stream=body.stream)
        return await _encode(request, shape, plans, events, stream=body.stream)
    except BaseException:
        ticket.release()  # also when `events` never started, so never ran its own release
        raise


async def _encode(request: Request, shape: Shape, plans: list[ChoicePlan],
                  events: AsyncGenerator[Event, None], *, stream: bool) -> Response:
    if stream:
        return await stream_response(shape, [p.index for p in plans], events,
                                     send_timeout=request.app.state.send_timeout,
                                     open_within=request.app.state.stream_open_within)
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


async def _forward_chat(request: Request, served: ServedModel, forward: ChatForward,
                        stream: bool) -> Response:
    """The upstream's own chat answer (chat passthrough), whole or streamed, once admitted."""
    ticket = await admit(request.app.state.metrics, served.admission)
    try:
        if stream:
            chunks = observed_forward(holding(ticket, stream_chat(forward)), forward.role)
            return await forwarded_stream_response(chunks, send_timeout=request.app.state.send_timeout)
        answer = await answer_chat(forward)
    except BaseException:
        ticket.release()  # also when the stream never started, so `holding` never ran
        raise
    ticket.release()
    note_forwarded_answer(answer, forward.role)
    return JSONResponse(answer)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    served = _served(request, body)
    forward = await chat_forward(body, lambda: _json_body(request), served, request.app.state.limits)
    if forward is not None:
        return await _unless_client_leaves(request, _forward_chat(request, served, forward, body.stream))
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


Readiness = tuple[dict[str, Any], int]  # the body and status of a /ready answer


async def _readiness(registry: ModelRegistry) -> Readiness:
    upstreams, templates = await asyncio.gather(registry.readiness(), registry.template_problems())
    is_ready = all(upstreams.values()) and not templates
    body: dict[str, Any] = {"status": "ready" if is_ready else "not ready", "upstreams": upstreams}
    if templates:
        body["chat_template"] = templates
    return body, 200 if is_ready else 503


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Every upstream's readiness, checked at most once per `READY_CACHE_SECONDS`: /ready may
    be open to anyone, and each check asks every upstream. Callers meanwhile share the last
    check, or the one under way, unless an upstream was reported down or back since."""
    state, registry = request.app.state, _registry(request)
    last: tuple[float, int, asyncio.Future[Readiness]] | None = getattr(state, "ready_check", None)
    now = time.monotonic()
    # A supervisor's report (an upstream process died or came back) makes the last check stale.
    if last is None or now - last[0] >= READY_CACHE_SECONDS or last[1] != registry.down_reports:
        check = asyncio.ensure_future(_readiness(registry))
        last = state.ready_check = (now, registry.down_reports, check)
    # Shielded: a caller that leaves does not cancel the others' check.
    body, status = await asyncio.shield(last[2])
    return JSONResponse(body, status_code=status)
