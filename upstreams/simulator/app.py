"""The simulated upstream as a web server speaking vLLM's OpenAI-compatible completions API.

Endpoints: ``POST /v1/completions`` (JSON or SSE stream), ``POST /v1/chat/completions`` (a small
one, see :mod:`.chat`), ``GET /v1/models``, ``GET /health``,
vLLM's ``POST /tokenize`` (a prompt; chat ``messages`` get vLLM's no-chat-template 400),
``POST /detokenize`` and ``GET /tokenizer_info`` (see :mod:`.tokenizer` for the token ids),
``GET /stats`` and ``POST /stats/reset`` (counters for tests and benchmarks), ``GET /faults``
and ``POST /faults`` (``{"faults": SPEC}``: the fault spec in force, see :mod:`.faults`).

Behaviour follows vLLM where the proxy can observe it: errors are
``{"error": {"message", "type", "param", "code"}}`` (vLLM 0.32); a ``model`` other than the served
name is a 404; EOS is reported as a last token with empty text (counted in
``completion_tokens``); ``logprobs=k`` gives the top k plus the sampled token; with stop strings
the streamed text is held back by the longest stop string's length minus one, so a stop string
is never sent; ``max_tokens: null`` means 16, and a
``max_tokens`` over the room the prompt leaves is shortened to it (none left: a 400); echo with logprobs
bypasses the prefix cache. ``/stats`` counts requests that passed validation.

CLI: ``nudging-proxy simulate`` uses :func:`add_arguments` and :func:`run`; the module also runs
on its own (``python -m upstreams.simulator``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..cli import add_listen_arguments, add_serving_arguments, positive_int
from ..openai_api import (
    DEFAULT_MAX_LOGPROBS,
    SSE_DONE,
    ApiError,
    DetokenizeRequest,
    Reply,
    TokenizeRequest,
    check_model,
    context_length_error,
    logprobs_block,
    parse_body,
    parse_completion_request,
)
from ..openai_server import EventStream, add_common_routes, add_error_handlers, read_json
from .chat import ChatReply, completion_body, forced_tool, structured_text, tool_call
from .documents import PROFILES
from .engine import Engine, GenerationResult, Step, reported_logprobs
from .faults import (
    CLOSE_CONNECTION,
    STREAM_FAULTS,
    Faults,
    FaultSpecError,
    ModelsFaults,
    connection_closer,
    disrupt,
    padded,
    padded_second_event,
    slowed,
    until_disconnected,
    whole_answer_fault,
)
from .latency import PROFILE_DEFAULTS, LatencyModel
from .model import LanguageModel, logprob
from .protocol import SIMULATOR, SimulatorRequest, ids_text
from .tokenizer import reported_tokens, token_id

# vLLM 0.32's answer to a chat for /tokenize when the model has no chat template.
NO_CHAT_TEMPLATE = ("As of transformers v4.44, default chat template is no longer allowed, so you must "
                    "provide a chat template if the tokenizer does not define one.")


def default_model_name(profile: str) -> str:
    # Configs name a simulated upstream's model by its profile (``model: base``).
    return profile


class SimulatorApp(FastAPI):
    """The app, with a way for faults to close a connection without answering.

    ASGI has none, so the server's own `send` (uvicorn's, before any middleware wraps it)
    is asked for its connection here, and the closer is left in the request's scope.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            close = connection_closer(send)
            if close is not None:
                scope[CLOSE_CONNECTION] = close
        await super().__call__(scope, receive, send)


def create_app(
    profile: str,
    time_scale: float = 1.0,
    latency: LatencyModel | None = None,
    max_model_len: int = 4096,
    model_name: str | None = None,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    faults: str = "",
) -> FastAPI:
    """A FastAPI app serving one simulated model (`profile`: base, aligned or aligned-base),
    misbehaving as the fault spec `faults` says (see :mod:`.faults`)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if time_scale < 0 or not math.isfinite(time_scale):
        raise ValueError("time_scale must be a finite number >= 0")
    if max_model_len < 1:
        raise ValueError("max_model_len must be positive")
    name = model_name or default_model_name(profile)
    model = LanguageModel(profile)
    engine = Engine(model, latency or LatencyModel.for_profile(profile), time_scale)

    injector = Faults(faults)

    app = SimulatorApp(title=f"nudging-proxy simulator ({profile})", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.model_name = name
    app.state.faults = injector
    app.add_middleware(ModelsFaults, faults=injector, stats=engine.stats)
    add_error_handlers(app, SIMULATOR)
    add_common_routes(app, name, int(time.time()), max_model_len, SIMULATOR, engine.stats,
                      engine.stats.reset)

    @app.get("/faults")
    async def read_faults() -> dict[str, Any]:
        return injector.describe()

    @app.post("/faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        spec = body.get("faults") if isinstance(body, dict) else None
        if spec is not None and not isinstance(spec, str):
            raise ApiError("faults must be a string (a fault spec) or null", param="faults")
        try:
            injector.set(spec or "")
        except FaultSpecError as error:
            raise ApiError(str(error), param="faults") from None
        return injector.describe()

    @app.post("/tokenize", response_model=None)
    async def tokenize_prompt(request: Request) -> Response | dict[str, Any]:
        # vLLM's /tokenize (at the server root), in its completions form; the simulated models
        # have no chat template, so the chat form gets vLLM's answer for such a model.
        try:
            body = parse_body(TokenizeRequest, await read_json(request))
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening any more
        check_model(body.model, name, SIMULATOR)
        if body.messages is not None:
            raise ApiError(NO_CHAT_TEMPLATE)
        if body.prompt is None:
            raise ApiError("either prompt or messages is required")
        fault = injector.pick("tokenize", body.prompt)
        if fault is not None:
            answer = await whole_answer_fault(fault, request, engine.stats)
            if answer is not None:
                return answer
        # No special tokens: `add_special_tokens` changes nothing.
        tokens = reported_tokens(body.prompt)
        return {"count": len(tokens), "max_model_len": max_model_len,
                "tokens": [token_id(token) for token in tokens],
                "token_strs": tokens if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_body(DetokenizeRequest, await read_json(request))
        check_model(body.model, name, SIMULATOR)
        return {"prompt": ids_text(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        # vLLM's (served there with --enable-tokenizer-info-endpoint): the tokenizer's
        # tokenizer_config.json. The simulated tokenizer has no special tokens.
        return {"tokenizer_class": "SimulatorTokenizer", "model_max_length": max_model_len,
                "add_bos_token": False, "add_eos_token": False, "bos_token": None,
                "eos_token": None, "pad_token": None, "unk_token": None,
                "clean_up_tokenization_spaces": False}


    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        try:
            body = await read_json(request)
        except ClientDisconnect:
            # A client that gives up early (e.g. a cancelled probe): nothing to answer.
            return Response(status_code=499)
        completion = parse_completion_request(SimulatorRequest, body, max_logprobs, SIMULATOR)
        check_model(completion.model, name, SIMULATOR)
        prompt = completion.prompt_text()
        prompt_tokens = reported_tokens(prompt)
        count = len(prompt_tokens)
        fault = injector.pick("stream" if completion.stream else "non-stream", prompt)
        if fault is not None:
            if fault.name == "context_overflow":
                raise context_length_error(max_model_len, count, completion.max_tokens or max_model_len,
                                           SIMULATOR)
            answer = await whole_answer_fault(fault, request, engine.stats,
                                              stream=bool(completion.stream))
            if answer is not None:
                return answer
        sampling = completion.sampling(count, max_model_len, SIMULATOR)
        logprobs = None if fault is not None and fault.name == "no_logprobs" else completion.logprobs
        reply = _Reply(name, bool(completion.echo), prompt, model if completion.echo else None, logprobs,
                       f"{SIMULATOR.owned_by}-{profile}")
        outcome = GenerationResult()
        scores_prompt = bool(completion.echo) and completion.logprobs is not None
        steps: AsyncGenerator[Step, None] = engine.generate(prompt, prompt_tokens, sampling, outcome,
                                                        prompt_logprobs=scores_prompt)
        if fault is not None and fault.name == "slow":
            steps = slowed(steps, fault.amount)
        if completion.stream:
            events = _stream(reply, steps, outcome, count, completion.include_usage(),
                             prompt_only=sampling.max_tokens == 0)
            if fault is not None and fault.name in STREAM_FAULTS:
                events = disrupt(fault, events, request.scope)
            if fault is not None and fault.name == "oversized":
                events = padded_second_event(events, fault.events)
            return EventStream(events)
        collected = await _unless_client_leaves(request, _collect(steps))
        if collected is None:
            return Response(status_code=499)  # nobody is listening any more
        full = reply.full(collected, outcome, count)
        if fault is not None and fault.name == "oversized":
            full = padded(full, fault.events)
        return JSONResponse(full)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        try:
            body = await read_json(request)
        except ClientDisconnect:
            return Response(status_code=499)  # nobody is listening any more
        completion = parse_completion_request(SimulatorRequest, completion_body(body), max_logprobs,
                                              SIMULATOR)
        check_model(completion.model, name, SIMULATOR)
        prompt = completion.prompt_text()
        prompt_tokens = reported_tokens(prompt)
        sampling = completion.sampling(len(prompt_tokens), max_model_len, SIMULATOR)
        reply = ChatReply(name, f"{SIMULATOR.owned_by}-{profile}")
        function, structured = forced_tool(body), structured_text(body)
        if function is not None or structured is not None:
            calls = [tool_call(function)] if function is not None else []
            content = structured if structured is not None else ""
            written = len(reported_tokens(content or json.dumps(calls)))
            if completion.stream:
                return EventStream(_fixed_chat_stream(reply, content, calls, len(prompt_tokens), written,
                                                      completion.include_usage()))
            return JSONResponse(reply.body(content, calls, "stop", None, len(prompt_tokens), written))
        outcome = GenerationResult()
        steps = engine.generate(prompt, prompt_tokens, sampling, outcome)
        if completion.stream:
            return EventStream(_chat_stream(reply, steps, outcome, len(prompt_tokens),
                                            completion.include_usage()))
        if await _unless_client_leaves(request, _collect(steps)) is None:
            return Response(status_code=499)
        return JSONResponse(reply.body(outcome.text, [], outcome.finish_reason, outcome.stop_reason,
                                       len(prompt_tokens), outcome.completion_tokens))

    return app


async def _collect(steps: AsyncGenerator[Step, None]) -> list[Step]:
    try:
        return [step async for step in steps]
    finally:
        await steps.aclose()


async def _unless_client_leaves(request: Request, collecting: Coroutine[Any, Any, list[Step]],
                                ) -> list[Step] | None:
    """The steps, or None if the client left first: then the generation stops at once, as
    vLLM aborts a request whose client disconnected."""
    generation = asyncio.ensure_future(collecting)
    leaving = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({generation, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        generation.cancel()
        await asyncio.gather(generation, leaving, return_exceptions=True)
    return None if generation.cancelled() else generation.result()


class _Reply(Reply):
    """The simulator's logprobs: its steps' own, and the prompt's when echoing."""

    def __init__(self, name: str, echo: bool, prompt: str, model: LanguageModel | None,
                 logprobs: int | None, system_fingerprint: str) -> None:
        super().__init__(name, system_fingerprint)
        self.echo = echo
        self.prompt = prompt
        self.model = model
        self.logprobs = logprobs
        self.base_offset = len(prompt) if echo else 0

    def prompt_logprobs(self) -> dict[str, Any] | None:
        if self.logprobs is None or not self.echo or self.model is None:
            return None
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        offset = 0
        for token, distribution in self.model.prompt_distributions(self.prompt):
            value: float | None = None
            top: dict[str, float] | None = None
            if distribution is not None:
                probabilities = dict(distribution)
                unlisted = max(1.0 - sum(probabilities.values()), 1e-6) / 100
                value = logprob(probabilities.get(token, unlisted))
                top = {t: logprob(p) for t, p in distribution[: self.logprobs]}
                top.setdefault(token, value)
            for piece, piece_value, piece_top in reported_logprobs(token, value, top):
                tokens.append(piece)
                values.append(piece_value)
                tops.append(piece_top)
                offsets.append(offset)
            offset += len(token)
        return logprobs_block(tokens, values, tops, offsets)

    def step_logprobs(self, steps: list[Step]) -> dict[str, Any]:
        return logprobs_block(
            [s.token for s in steps],
            [s.logprob for s in steps],
            [s.top_logprobs for s in steps],
            [self.base_offset + s.offset for s in steps],
        )

    def full(self, steps: list[Step], outcome: GenerationResult, prompt_tokens: int) -> dict[str, Any]:
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.step_logprobs(steps)
            prompt_part = self.prompt_logprobs()
            if prompt_part is not None:
                logprobs = {key: prompt_part[key] + logprobs[key] for key in logprobs}
        text = (self.prompt if self.echo else "") + outcome.text
        return self.body(text, logprobs, outcome.finish_reason, outcome.stop_reason,
                         prompt_tokens, outcome.completion_tokens)


async def _stream(reply: _Reply, steps: AsyncGenerator[Step, None], outcome: GenerationResult,
                  prompt_tokens: int, include_usage: bool, *, prompt_only: bool,
                  ) -> AsyncGenerator[str, None]:
    """SSE chunks: the prompt first when echoing, then one chunk per token, usage, [DONE].
    An echo of no tokens (`max_tokens: 0`) finishes on the prompt's chunk, as vLLM's does.

    If the client goes away, the server cancels this generator; closing `steps` then counts
    the request as cancelled and closes it, so generation stops at once.
    """
    try:
        if reply.echo:
            yield reply.chunk(reply.prompt, reply.prompt_logprobs(), "length" if prompt_only else None)
        async for step in steps:
            logprobs = reply.step_logprobs([step]) if reply.logprobs is not None else None
            yield reply.chunk(step.text, logprobs, step.finish_reason, step.stop_reason)
        if include_usage:
            yield reply.usage_chunk(prompt_tokens, outcome.completion_tokens)
        yield SSE_DONE
    finally:
        await steps.aclose()


async def _chat_stream(reply: ChatReply, steps: AsyncGenerator[Step, None], outcome: GenerationResult,
                       prompt_tokens: int, include_usage: bool) -> AsyncGenerator[str, None]:
    """vLLM's chat chunks: the role first, then one chunk per token, usage, [DONE]."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        async for step in steps:
            yield reply.chunk({"content": step.text}, step.finish_reason, step.stop_reason)
        if include_usage:
            yield reply.usage_chunk(prompt_tokens, outcome.completion_tokens)
        yield SSE_DONE
    finally:
        await steps.aclose()


async def _fixed_chat_stream(reply: ChatReply, content: str, calls: list[dict[str, Any]], prompt_tokens: int,
                             completion_tokens: int, include_usage: bool) -> AsyncGenerator[str, None]:
    """A tool call or a JSON text, streamed: the role, then the whole answer in one chunk."""
    yield reply.chunk({"role": "assistant", "content": ""})
    if calls:
        yield reply.chunk({"tool_calls": [{"index": index, **call} for index, call in enumerate(calls)]})
    else:
        yield reply.chunk({"content": content})
    yield reply.chunk({"content": ""}, "stop")
    if include_usage:
        yield reply.usage_chunk(prompt_tokens, completion_tokens)
    yield SSE_DONE


# ---------------------------------------------------------------------------------------------
# Command line


def _fault_spec(value: str) -> str:
    try:
        Faults(value)
    except FaultSpecError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _time_scale(value: str) -> float:
    try:
        scale = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if scale < 0 or not math.isfinite(scale):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return scale


def _latency_spec(value: str) -> str:
    try:
        PROFILE_DEFAULTS["base"].with_overrides(value)  # checks names and numbers
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nudging-proxy simulate``."""
    parser.add_argument("--profile", required=True, choices=PROFILES,
                        help="which simulated model to serve")
    add_listen_arguments(parser)
    parser.add_argument("--time-scale", type=_time_scale, default=1.0,
                        help="multiply all simulated delays (0 = no delay)")
    parser.add_argument("--latency", type=_latency_spec, default=None, metavar="NAME=VALUE,...",
                        help="override latency settings, e.g. "
                             "request_ms=10,decode_ms=30,prefill_ms=0.3 "
                             "(also block_tokens, cache_tokens)")
    parser.add_argument("--faults", type=_fault_spec, default="", metavar="SPEC",
                        help="inject faults, e.g. 'stream_cut@0.2,http_503' or 'kind=stream:stall' "
                             "(grammar in upstreams/simulator/faults.py and the README; "
                             "POST /faults changes it at run time)")
    parser.add_argument("--max-model-len", type=positive_int, default=4096,
                        help="context length in tokens")
    parser.add_argument("--model-name", default=None,
                        help="model name to serve (default: the profile)")
    add_serving_arguments(parser)


def latency_from_args(args: argparse.Namespace) -> LatencyModel:
    latency = LatencyModel.for_profile(args.profile)
    if args.latency:
        latency = latency.with_overrides(args.latency)
    return latency


def run(args: argparse.Namespace) -> None:
    try:
        latency = latency_from_args(args)
    except ValueError as error:
        raise SystemExit(f"simulate: --latency: {error}") from None
    app = create_app(args.profile, args.time_scale, latency, args.max_model_len, args.model_name,
                     args.max_logprobs, args.faults)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m upstreams.simulator",
        description="Serve a simulated language model behind vLLM's completions API.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
