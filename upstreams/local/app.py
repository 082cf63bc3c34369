"""The local upstream's web server: a GGUF model behind vLLM's OpenAI-compatible API subset.

Endpoints: ``POST /v1/completions`` (JSON or SSE stream), ``GET /v1/models`` (with
``max_model_len``), ``GET /health``, ``GET /stats`` and ``POST /stats/reset``, and vLLM's
``POST /tokenize`` (a prompt, or chat ``messages`` rendered by the GGUF's chat template) and
``POST /detokenize``.

Response conventions (as vLLM, where the proxy can observe them): errors are
``{"error": {"message", "type", "param", "code"}}`` (vLLM 0.32); a ``model`` other than the served
name is a 404; an end token is reported as a last token with empty text; ``logprobs=k`` gives
the top k plus the sampled token, of the distribution before temperature; with stop strings
streamed text is held back while it may begin a stop string. ``logprobs.tokens`` are the
pieces of the returned text each token produced (a token ending inside a multi-byte character
gives "" and the next one the whole character), so they join to the text and ``text_offset``
indexes into it. ``echo`` is served without logprobs; echo with logprobs is a 400.

The command line (``nudging-proxy local-upstream``, ``python -m upstreams.local``) is in ``cli``;
it calls :func:`serve`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from ..openai_api import (
    DEFAULT_MAX_LOGPROBS,
    SSE_DONE,
    ApiError,
    DetokenizeRequest,
    Reply,
    TokenizeRequest,
    check_model,
    logprobs_block,
    parse_body,
    parse_completion_request,
    sse,
)
from ..openai_server import EventStream, add_common_routes, add_error_handlers, read_json
from .chat import ChatTemplate
from .defaults import DEFAULT_CTX
from .generation import GenerationResult, Step
from .protocol import LOCAL, LocalRequest
from .weights import MissingModelError
from .worker import Job, Worker

if TYPE_CHECKING:  # llama-cpp-python is imported only to serve, so the CLI hooks load without it
    from .engine import LlamaCppModel

log = logging.getLogger(__name__)


def default_model_name(path: str | Path) -> str:
    return Path(path).stem


def create_app(model: LlamaCppModel, model_name: str | None = None,
               max_logprobs: int = DEFAULT_MAX_LOGPROBS) -> FastAPI:
    """A FastAPI app serving `model` (which the caller owns and closes).

    The app's worker thread starts with the first request and stops when the app shuts down.
    """
    name = model_name or default_model_name(model.path)
    worker = Worker(model)
    template = _chat_template(model)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title=f"nudging-proxy local upstream ({name})", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.worker = worker
    app.state.model_name = name
    add_error_handlers(app, LOCAL)
    add_common_routes(app, name, int(time.time()), model.n_ctx, LOCAL, worker.stats,
                      worker.reset_stats)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_body(TokenizeRequest, await read_json(request))
        check_model(body.model, name, LOCAL)
        if body.messages is not None:
            if template is None:
                raise ApiError("this model's GGUF file has no chat template", param="messages")
            text = template.render(body.messages,
                                   add_generation_prompt=body.add_generation_prompt,
                                   extra=body.chat_template_kwargs)
            # The template writes BOS itself, so nothing is added (vLLM's default for chat).
            add_special = bool(body.add_special_tokens)
        elif body.prompt is not None:
            text = body.prompt
            add_special = body.add_special_tokens is not False
        else:
            raise ApiError("either prompt or messages is required", param="prompt")
        tokens = model.tokenize(text, add_special=add_special)
        return {"count": len(tokens), "max_model_len": model.n_ctx, "tokens": tokens,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_body(DetokenizeRequest, await read_json(request))
        check_model(body.model, name, LOCAL)
        bad = [t for t in body.tokens if not model.valid_token(t)]
        if bad:
            raise ApiError(f"token id {bad[0]} is out of vocabulary (size {model.n_vocab})",
                           param="tokens")
        return {"prompt": model.detokenize(body.tokens)}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        try:
            raw = await read_json(request)
        except ClientDisconnect:
            return Response(status_code=499)  # the client gave up (a cancelled probe)
        completion = parse_completion_request(LocalRequest, raw, max_logprobs, LOCAL)
        check_model(completion.model, name, LOCAL)
        prompt = completion.prompt_text()
        prompt_tokens = model.tokenize(prompt)
        if not prompt_tokens:
            raise ApiError("the prompt is empty", param="prompt")
        count = len(prompt_tokens)
        sampling = completion.sampling(count, model.n_ctx, LOCAL)
        reply = _Reply(name, prompt if completion.echo else "", completion.logprobs is not None)
        job = worker.submit(prompt_tokens, sampling, stream=bool(completion.stream))
        if completion.stream:
            return _JobStream(_stream(reply, job, completion.include_usage()), job)
        return await _complete(request, reply, job)

    return app


def _chat_template(model: LlamaCppModel) -> ChatTemplate | None:
    source = model.metadata("tokenizer.chat_template")
    if not source:
        return None
    try:
        return ChatTemplate(source, bos_token=model.token_text(model.bos_id),
                            eos_token=model.token_text(model.eos_id))
    except ValueError:
        log.warning("ignoring the chat template of %s: it does not parse", model.path)
        return None


async def _cancel_on_disconnect(receive: Callable[[], Any], job: Job) -> None:
    # After the body is read, the next ASGI message can only be the client leaving.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _complete(request: Request, reply: _Reply, job: Job) -> Response:
    watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, job))
    try:
        async for _ in job.steps():
            pass
    finally:
        watcher.cancel()
    if job.outcome.finish_reason is None:
        return Response(status_code=499)  # cancelled: nobody is waiting for an answer
    return JSONResponse(reply.full(job.outcome))


class _JobStream(EventStream):
    """A stream that cancels its job however the response ends, even before it started."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content)
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


class _Reply(Reply):
    """The local upstream's logprobs: each token's piece of the returned text."""

    def __init__(self, name: str, echoed: str, logprobs: bool) -> None:
        super().__init__(name)
        self.echoed = echoed  # the prompt when echoing, else ""
        self.logprobs = logprobs

    def step_logprobs(self, steps: list[Step], text_length: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        # Pieces are clipped to the returned text (a stop string cuts it), so they join to it.
        tokens: list[str] = []
        offsets: list[int] = []
        for step in steps:
            start = min(step.offset, text_length)
            end = min(step.offset + len(step.piece), text_length)
            tokens.append(step.piece[: end - start])
            offsets.append(len(self.echoed) + start)
        return logprobs_block(tokens, [s.logprob for s in steps], [s.top_logprobs for s in steps],
                              offsets)

    def full(self, outcome: GenerationResult) -> dict[str, Any]:
        return self.body(self.echoed + outcome.text,
                         self.step_logprobs(outcome.steps, len(outcome.text)),
                         outcome.finish_reason, outcome.stop_reason, outcome.prompt_tokens,
                         outcome.completion_tokens)


async def _stream(reply: _Reply, job: Job, include_usage: bool) -> AsyncIterator[str]:
    """SSE: the prompt first when echoing, one chunk per token, the usage chunk, [DONE]."""
    outcome = job.outcome
    try:
        if reply.echoed:
            yield reply.chunk(reply.echoed, None)
        async for step in job.steps():
            # A step's piece is clipped only where it ends the text (a stop string).
            limit = len(outcome.text) if step.finish_reason else step.offset + len(step.piece)
            yield reply.chunk(step.delta, reply.step_logprobs([step], limit), step.finish_reason,
                              step.stop_reason)
        if include_usage:
            yield reply.usage_chunk(outcome.prompt_tokens, outcome.completion_tokens)
    except Exception as error:  # the stream has started: report in-band, as vLLM does
        log.exception("streamed generation failed")
        failure = ApiError(f"generation failed: {type(error).__name__}", 500,
                           "InternalServerError")
        yield sse(failure.body())
    yield SSE_DONE


def serve(host: str, port: int, gguf: str | Path, *, model_name: str | None = None,
          n_threads: int | None = None, n_ctx: int = DEFAULT_CTX,
          max_logprobs: int = DEFAULT_MAX_LOGPROBS, log_level: str = "warning") -> None:
    try:
        from .engine import LlamaCppModel
    except ImportError as error:
        raise MissingModelError("llama-cpp-python is not installed; install the demo extra "
                                "with pip install '.[demo]'") from error
    with LlamaCppModel(gguf, n_ctx=n_ctx, n_threads=n_threads) as model:
        app = create_app(model, model_name or default_model_name(gguf), max_logprobs)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
