"""The local upstream's web server: a GGUF model behind vLLM's OpenAI-compatible API subset.

Endpoints: ``POST /v1/completions`` (JSON or SSE stream), ``GET /v1/models`` (with
``max_model_len``), ``GET /health``, ``GET /stats`` and ``POST /stats/reset``, and vLLM's
``POST /tokenize`` (a prompt, or chat ``messages`` rendered by the GGUF's chat template) and
``POST /detokenize``.

Response conventions (as vLLM, where the proxy can observe them): errors are
``{"object": "error", "message", "type", "param", "code"}``; a ``model`` other than the served
name is a 404; an end token is reported as a last token with empty text; ``logprobs=k`` gives
the top k plus the sampled token, of the distribution before temperature; with stop strings
streamed text is held back while it may begin a stop string. ``logprobs.tokens`` are the
pieces of the returned text each token produced (a token ending inside a multi-byte character
gives "" and the next one the whole character), so they join to the text and ``text_offset``
indexes into it. ``echo`` is served without logprobs; echo with logprobs is a 400.

CLI: ``nudging-proxy local-upstream`` uses :func:`add_arguments` and :func:`run`; the module
also runs on its own (``python -m upstreams.local``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from .chat import ChatTemplate
from .generation import DEFAULT_CTX, EngineError, Outcome, Sampling, Step
from .protocol import (
    DEFAULT_MAX_LOGPROBS,
    ApiError,
    DetokenizeRequest,
    TokenizeRequest,
    context_length_error,
    parse_body,
    parse_completion_request,
    usage_block,
)
from .weights import BUNDLED, MissingModelError
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
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title=f"nudging-proxy local upstream ({name})", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.worker = worker
    app.state.model_name = name

    @app.exception_handler(ApiError)
    async def _refused(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def _failed(_: Request, error: Exception) -> JSONResponse:
        failure = ApiError(f"internal server error: {type(error).__name__}", 500,
                           "InternalServerError")
        return JSONResponse(failure.body(), status_code=500)

    def check_model(requested: str | None) -> None:
        if requested is not None and requested != name:
            raise ApiError(f"The model `{requested}` does not exist.", 404, "NotFoundError",
                           param="model")

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": name, "object": "model", "created": started, "owned_by": "nudging-proxy",
            "root": name, "parent": None, "max_model_len": model.n_ctx, "permission": [],
        }]}

    @app.get("/stats")
    async def stats() -> dict[str, int]:
        return worker.stats.as_dict()

    @app.post("/stats/reset")
    async def reset_stats() -> dict[str, int]:
        worker.reset_stats()
        return worker.stats.as_dict()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_body(TokenizeRequest, await _json(request))
        check_model(body.model)
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
        body = parse_body(DetokenizeRequest, await _json(request))
        check_model(body.model)
        bad = [t for t in body.tokens if not model.valid_token(t)]
        if bad:
            raise ApiError(f"token id {bad[0]} is out of vocabulary (size {model.n_vocab})",
                           param="tokens")
        return {"prompt": model.detokenize(body.tokens)}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        try:
            raw = await _json(request)
        except ClientDisconnect:
            return Response(status_code=499)  # the client gave up (a cancelled probe)
        completion = parse_completion_request(raw, max_logprobs)
        check_model(completion.model)
        prompt = completion.prompt_text()
        prompt_tokens = model.tokenize(prompt)
        if not prompt_tokens:
            raise ApiError("the prompt is empty", param="prompt")
        count = len(prompt_tokens)
        max_tokens = (completion.max_tokens if completion.max_tokens is not None
                      else max(model.n_ctx - count, 0))
        if count + max_tokens > model.n_ctx:
            raise context_length_error(model.n_ctx, count, max_tokens)
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=completion.temperature if completion.temperature is not None else 1.0,
            top_p=completion.top_p if completion.top_p is not None else 1.0,
            seed=completion.seed,
            logprobs=completion.logprobs,
            stop=tuple(completion.stop or ()),
        )
        reply = _Reply(name, prompt if completion.echo else "", completion.logprobs is not None)
        job = worker.submit(prompt_tokens, sampling, stream=bool(completion.stream))
        if completion.stream:
            include_usage = bool(completion.stream_options
                                 and completion.stream_options.include_usage)
            return _JobStream(_stream(reply, job, include_usage), job)
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


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError("the request body is not valid JSON") from None


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


class _JobStream(StreamingResponse):
    """A stream that cancels its job however the response ends, even before it started."""

    def __init__(self, content: AsyncIterator[str], job: Job) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


class _Reply:
    """Shapes the JSON body and the SSE chunks of one completion."""

    def __init__(self, name: str, echoed: str, logprobs: bool) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.name = name
        self.echoed = echoed  # the prompt when echoing, else ""
        self.logprobs = logprobs

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.name, "choices": choices}

    @staticmethod
    def choice(text: str, logprobs: dict[str, Any] | None, finish_reason: str | None,
               stop_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": stop_reason}

    def logprobs_block(self, steps: list[Step], text_length: int) -> dict[str, Any]:
        # Pieces are clipped to the returned text (a stop string cuts it), so they join to it.
        tokens: list[str] = []
        offsets: list[int] = []
        for step in steps:
            start = min(step.offset, text_length)
            end = min(step.offset + len(step.piece), text_length)
            tokens.append(step.piece[: end - start])
            offsets.append(len(self.echoed) + start)
        return {"text_offset": offsets, "token_logprobs": [s.logprob for s in steps],
                "tokens": tokens, "top_logprobs": [s.top_logprobs for s in steps]}

    def full(self, outcome: Outcome) -> dict[str, Any]:
        logprobs = (self.logprobs_block(outcome.steps, len(outcome.text)) if self.logprobs
                    else None)
        body = self.envelope([self.choice(self.echoed + outcome.text, logprobs,
                                          outcome.finish_reason, outcome.stop_reason)])
        body["usage"] = usage_block(outcome.prompt_tokens, outcome.completion_tokens)
        return body

    def chunk(self, step: Step, text_length: int) -> dict[str, Any]:
        logprobs = self.logprobs_block([step], text_length) if self.logprobs else None
        return self.envelope([self.choice(step.delta, logprobs, step.finish_reason,
                                          step.stop_reason)])


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(reply: _Reply, job: Job, include_usage: bool) -> AsyncIterator[str]:
    """SSE: the prompt first when echoing, one chunk per token, the usage chunk, [DONE]."""
    outcome = job.outcome
    try:
        if reply.echoed:
            yield _sse(reply.envelope([reply.choice(reply.echoed, None, None, None)]))
        async for step in job.steps():
            # A step's piece is clipped only where it ends the text (a stop string).
            limit = len(outcome.text) if step.finish_reason else step.offset + len(step.piece)
            yield _sse(reply.chunk(step, limit))
        if include_usage:
            chunk = reply.envelope([])
            chunk["usage"] = usage_block(outcome.prompt_tokens, outcome.completion_tokens)
            yield _sse(chunk)
    except Exception as error:  # the stream has started: report in-band, as vLLM does
        log.exception("streamed generation failed")
        failure = ApiError(f"generation failed: {type(error).__name__}", 500,
                           "InternalServerError")
        yield _sse({"error": failure.body()})
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# Command line


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``nudging-proxy local-upstream``."""
    parser.add_argument("--gguf", required=True, metavar="PATH",
                        help="GGUF model file to serve; 'gemma' or 'smollm' name the models "
                             "of the demo extra (Gemma 3 270M base, SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--name", default=None,
                        help="model name to serve (default: the file name without .gguf)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="llama.cpp threads for generation and prompt evaluation (default: "
                             "half the cores, as a base and a nudger share the machine; threads "
                             "beyond the free cores slow llama.cpp down sharply)")
    parser.add_argument("--ctx", type=_positive_int, default=DEFAULT_CTX,
                        help="context length in tokens (capped at the model's training length)")
    parser.add_argument("--max-logprobs", type=_positive_int, default=DEFAULT_MAX_LOGPROBS,
                        help="largest logprobs value a request may ask for")
    parser.add_argument("--log-level", default="warning",
                        choices=("critical", "error", "warning", "info", "debug"))


def resolve_gguf(value: str) -> Path:
    """A GGUF path, or a bundled model's file for the names 'gemma' and 'smollm'."""
    path = Path(value).expanduser()
    if not path.exists() and value in BUNDLED:
        return BUNDLED[value]()
    return path


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


def run(args: argparse.Namespace) -> None:
    try:
        path = resolve_gguf(args.gguf)
        serve(args.host, args.port, path, model_name=args.name, n_threads=args.threads,
              n_ctx=args.ctx, max_logprobs=args.max_logprobs, log_level=args.log_level)
    except (MissingModelError, EngineError) as error:
        raise SystemExit(f"local-upstream: {error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m upstreams.local",
        description="Serve a GGUF model (llama.cpp) behind vLLM's completions API.",
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
