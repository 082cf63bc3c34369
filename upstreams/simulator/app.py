"""The simulated upstream as a web server speaking vLLM's OpenAI-compatible completions API.

Endpoints: ``POST /v1/completions`` (JSON or SSE stream), ``GET /v1/models``, ``GET /health``,
``GET /stats`` and ``POST /stats/reset`` (counters for tests and benchmarks).

Behaviour follows vLLM where the proxy can observe it: errors are
``{"object": "error", "message", "type", "param", "code"}``; a ``model`` other than the served
name is a 404; EOS is reported as a last token with empty text (counted in
``completion_tokens``); ``logprobs=k`` gives the top k plus the sampled token; with stop strings
the streamed text is held back by the longest stop string's length minus one, so a stop string
is never sent; ``max_tokens: null`` means "the rest of the context"; echo with logprobs
bypasses the prefix cache. ``/stats`` counts requests that passed validation.

CLI: ``nudging-proxy simulate`` uses :func:`add_arguments` and :func:`run`; the module also runs
on its own (``python -m upstreams.simulator``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from .documents import PROFILES
from .engine import Engine, Outcome, Sampling, Step
from .latency import PROFILE_DEFAULTS, LatencyModel
from .model import LanguageModel, logprob
from .protocol import (
    SimulatorError,
    context_length_error,
    logprobs_block,
    parse_completion_request,
    usage_block,
)
from .tokenizer import tokenize

DEFAULT_MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
_DISCONNECT_CHECK_EVERY = 4  # tokens between disconnect checks of non-streaming requests


def default_model_name(profile: str) -> str:
    # Configs name a simulated upstream's model by its profile (``model: base``).
    return profile


def create_app(
    profile: str,
    time_scale: float = 1.0,
    latency: LatencyModel | None = None,
    max_model_len: int = 4096,
    model_name: str | None = None,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
) -> FastAPI:
    """A FastAPI app serving one simulated model (`profile`: base, aligned or aligned-base)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    if time_scale < 0 or not math.isfinite(time_scale):
        raise ValueError("time_scale must be a finite number >= 0")
    if max_model_len < 1:
        raise ValueError("max_model_len must be positive")
    name = model_name or default_model_name(profile)
    model = LanguageModel(profile)
    engine = Engine(model, latency or LatencyModel.for_profile(profile), time_scale)
    started = int(time.time())

    app = FastAPI(title=f"nudging-proxy simulator ({profile})", docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.model_name = name

    @app.exception_handler(SimulatorError)
    async def _refused(_: Request, error: SimulatorError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def _failed(_: Request, error: Exception) -> JSONResponse:
        failure = SimulatorError(f"internal simulator error: {type(error).__name__}", 500,
                                 "InternalServerError")
        return JSONResponse(failure.body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{
                "id": name,
                "object": "model",
                "created": started,
                "owned_by": "nudging-proxy-simulator",
                "root": name,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [],
            }],
        }

    @app.post("/tokenize")
    async def tokenize_prompt(request: Request) -> dict[str, Any]:
        # vLLM's /tokenize (at the server root); token ids do not exist here, so the
        # token strings stand in for them.
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise SimulatorError("the request body is not valid JSON") from None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise SimulatorError("prompt must be a string")
        tokens = tokenize(prompt)
        return {"count": len(tokens), "max_model_len": max_model_len, "token_strs": tokens}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return engine.stats.as_dict()

    @app.post("/stats/reset")
    async def reset_stats() -> dict[str, int]:
        engine.stats.reset()
        return engine.stats.as_dict()

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
        except ClientDisconnect:
            # A client that gives up early (e.g. a cancelled probe): nothing to answer.
            return Response(status_code=499)
        except (ValueError, UnicodeDecodeError):
            raise SimulatorError("the request body is not valid JSON") from None
        completion = parse_completion_request(body, max_logprobs)
        if completion.model is not None and completion.model != name:
            raise SimulatorError(f"The model `{completion.model}` does not exist.", 404,
                                 "NotFoundError")
        prompt = completion.prompt_text()
        prompt_tokens = tokenize(prompt)
        count = len(prompt_tokens)
        max_tokens = (completion.max_tokens if completion.max_tokens is not None
                      else max(max_model_len - count, 0))
        if count + max_tokens > max_model_len:
            raise context_length_error(max_model_len, count, max_tokens)
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=completion.temperature if completion.temperature is not None else 1.0,
            top_p=completion.top_p if completion.top_p is not None else 1.0,
            seed=completion.seed,
            logprobs=completion.logprobs,
            stop=completion.stop_strings(),
        )
        reply = _Reply(name, bool(completion.echo), prompt, model if completion.echo else None,
                       completion.logprobs)
        outcome = Outcome()
        scores_prompt = bool(completion.echo) and completion.logprobs is not None
        steps = engine.generate(prompt, prompt_tokens, sampling, outcome,
                                prompt_logprobs=scores_prompt)
        if completion.stream:
            options = completion.stream_options
            include_usage = bool(options and options.include_usage)
            return StreamingResponse(
                _stream(reply, steps, outcome, count, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        collected: list[Step] = []
        try:
            async for step in steps:
                collected.append(step)
                if (engine.time_scale > 0 and len(collected) % _DISCONNECT_CHECK_EVERY == 0
                        and await request.is_disconnected()):
                    break  # nobody waits for the answer: stop like vLLM aborts the request
        finally:
            await steps.aclose()
        return JSONResponse(reply.full(collected, outcome, count))

    return app


class _Reply:
    """Shapes responses and chunks for one request."""

    def __init__(self, name: str, echo: bool, prompt: str, model: LanguageModel | None,
                 logprobs: int | None) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.name = name
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
            tokens.append(token)
            offsets.append(offset)
            offset += len(token)
            if distribution is None:
                values.append(None)
                tops.append(None)
                continue
            probabilities = dict(distribution)
            unlisted = max(1.0 - sum(probabilities.values()), 1e-6) / 100
            value = logprob(probabilities.get(token, unlisted))
            top = {t: logprob(p) for t, p in distribution[: self.logprobs]}
            top.setdefault(token, value)
            values.append(value)
            tops.append(top)
        return logprobs_block(tokens, values, tops, offsets)

    def step_logprobs(self, steps: list[Step]) -> dict[str, Any]:
        return logprobs_block(
            [s.token for s in steps],
            [s.logprob for s in steps],
            [s.top_logprobs for s in steps],
            [self.base_offset + s.offset for s in steps],
        )

    def choice(self, text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
               stop_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": stop_reason}

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.name, "choices": choices}

    def full(self, steps: list[Step], outcome: Outcome, prompt_tokens: int) -> dict[str, Any]:
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.step_logprobs(steps)
            prompt_part = self.prompt_logprobs()
            if prompt_part is not None:
                logprobs = {key: prompt_part[key] + logprobs[key] for key in logprobs}
        text = (self.prompt if self.echo else "") + outcome.text
        body = self.envelope([self.choice(text, logprobs, outcome.finish_reason,
                                          outcome.stop_reason)])
        body["usage"] = usage_block(prompt_tokens, outcome.completion_tokens)
        return body


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(reply: _Reply, steps: AsyncGenerator[Step, None], outcome: Outcome,
                  prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """SSE chunks: the prompt first when echoing, then one chunk per token, usage, [DONE].

    If the client goes away, the server cancels this generator; closing `steps` then counts
    the request as cancelled and closes it, so generation stops at once.
    """
    try:
        if reply.echo:
            yield _sse(reply.envelope([reply.choice(reply.prompt, reply.prompt_logprobs(),
                                                    None, None)]))
        async for step in steps:
            logprobs = reply.step_logprobs([step]) if reply.logprobs is not None else None
            yield _sse(reply.envelope([reply.choice(step.text, logprobs, step.finish_reason,
                                                    step.stop_reason)]))
        if include_usage:
            chunk = reply.envelope([])
            chunk["usage"] = usage_block(prompt_tokens, outcome.completion_tokens)
            yield _sse(chunk)
        yield "data: [DONE]\n\n"
    finally:
        await steps.aclose()


# ---------------------------------------------------------------------------------------------
# Command line


def _reject_faults(value: str) -> str:
    raise argparse.ArgumentTypeError(
        "fault injection is not implemented yet; run the simulator without --faults"
    )


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


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nudging-proxy simulate``."""
    parser.add_argument("--profile", required=True, choices=PROFILES,
                        help="which simulated model to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--time-scale", type=_time_scale, default=1.0,
                        help="multiply all simulated delays (0 = no delay)")
    parser.add_argument("--latency", type=_latency_spec, default=None, metavar="NAME=VALUE,...",
                        help="override latency settings, e.g. "
                             "request_ms=10,decode_ms=30,prefill_ms=0.3 "
                             "(also block_tokens, cache_tokens)")
    parser.add_argument("--faults", type=_reject_faults, default=None,
                        help="fault injection (not implemented yet)")
    parser.add_argument("--max-model-len", type=_positive_int, default=4096,
                        help="context length in tokens")
    parser.add_argument("--model-name", default=None,
                        help="model name to serve (default: the profile)")
    parser.add_argument("--max-logprobs", type=_positive_int, default=DEFAULT_MAX_LOGPROBS,
                        help="largest logprobs value a request may ask for")
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"))


def latency_from_args(args: argparse.Namespace) -> LatencyModel:
    latency = LatencyModel.for_profile(args.profile)
    if args.latency:
        latency = latency.with_overrides(args.latency)
    return latency


def serve(
    host: str,
    port: int,
    profile: str,
    time_scale: float = 1.0,
    latency: LatencyModel | None = None,
    max_model_len: int = 4096,
    model_name: str | None = None,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    log_level: str = "warning",
) -> None:
    app = create_app(profile, time_scale, latency, max_model_len, model_name, max_logprobs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def run(args: argparse.Namespace) -> None:
    try:
        latency = latency_from_args(args)
    except ValueError as error:
        raise SystemExit(f"simulate: --latency: {error}") from None
    serve(args.host, args.port, args.profile, args.time_scale, latency, args.max_model_len,
          args.model_name, args.max_logprobs, args.log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m upstreams.simulator",
        description="Serve a simulated language model behind vLLM's completions API.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
