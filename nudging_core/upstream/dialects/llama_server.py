"""llama.cpp's `llama-server`, through its native `/completion` endpoint.

Its OpenAI-compatible `/v1/completions` has not always returned logprobs; the native
endpoint has (`n_probs`), with each token's exact bytes, which are decoded here with an
incremental UTF-8 decoder so no character is ever split. Streams end with an event whose
`stop` is true, without `[DONE]`.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Final, Required

from pydantic import Field, TypeAdapter, with_config
from typing_extensions import TypedDict

from nudging_core.types import Token

from ..call import CompletionCall
from ..errors import UpstreamError
from .base import ANSWER_SHAPE, Dialect, Parser, Reply, Request, Sender, checked

FINISH_REASONS = {"eos": "stop", "word": "stop", "limit": "length"}


# The fields read here, with their JSON types; anything else is an UpstreamError, not a
# TypeError further on (see the OpenAI dialect).
@with_config(ANSWER_SHAPE)
class _Alternative(TypedDict, total=False):
    token: str
    logprob: float


@with_config(ANSWER_SHAPE)
class _Probability(_Alternative, total=False):
    bytes: list[Annotated[int, Field(ge=0, le=255)]] | None
    top_logprobs: list[_Alternative] | None


@with_config(ANSWER_SHAPE)
class _Answer(TypedDict, total=False):
    content: Required[str | None]
    completion_probabilities: list[_Probability] | None
    stop: bool
    stop_type: str
    tokens_evaluated: int | None


_ANSWER: Final = TypeAdapter(_Answer)


def _answer(role: str, payload: Any) -> _Answer:
    return checked(_ANSWER, role, payload, "llama-server response")


def _token_bytes(entry: _Probability) -> bytes:
    raw = entry.get("bytes")
    if raw is not None:
        return bytes(raw)
    return entry.get("token", "").encode()


def _parse(
    role: str, decode: Callable[[bytes], str], payload: Any, *, need_logprobs: bool, stream: bool
) -> Reply:
    answer = _answer(role, payload)
    probabilities = answer.get("completion_probabilities")
    content = answer["content"] or ""
    reply = Reply(last=answer.get("stop", False) or not stream)
    if probabilities:
        for entry in probabilities:
            alternatives = entry.get("top_logprobs") or []
            top = {t.get("token", ""): t.get("logprob", -math.inf) for t in alternatives}
            chosen = entry.get("logprob", -math.inf)
            best = max([chosen, *top.values()])
            reply.tokens.append(Token(decode(_token_bytes(entry)), chosen, best, top))
    elif content:
        if need_logprobs:
            raise UpstreamError(role, "response carries no probabilities; nudging needs them")
        reply.tokens.append(Token(content, 0.0, 0.0))
    if reply.last:
        reply.finish_reason = FINISH_REASONS.get(answer.get("stop_type", ""), "stop")
        reply.prompt_tokens = answer.get("tokens_evaluated")
    return reply


class LlamaServer(Dialect):
    name: ClassVar[str] = "llama-server"

    def completion(self, call: CompletionCall, model: str, *, stream: bool) -> Request:
        body: dict[str, Any] = {
            **call.extra,
            "prompt": call.prompt,
            "n_predict": call.max_tokens,
            "temperature": call.temperature,
            "top_p": call.top_p,
            "stream": stream,
            "cache_prompt": True,
        }
        if call.logprobs is not None:
            body["n_probs"] = max(call.logprobs, 1)
        if call.seed is not None:
            body["seed"] = call.seed
        if call.stop:
            body["stop"] = list(call.stop)
        return Request("../completion", body)

    def parser(self, role: str, *, need_logprobs: bool, stream: bool) -> Parser:
        # One decoder per request: a character may be split across two tokens or events.
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode

        def parse(payload: Any) -> Reply:
            return _parse(role, decode, payload, need_logprobs=need_logprobs, stream=stream)

        return parse

    def tokenize(self, model: str, prompt: str) -> Request:
        return Request("../tokenize", {"content": prompt, "add_special": True})

    def token_count(self, payload: Any) -> int | None:
        tokens = payload.get("tokens") if isinstance(payload, dict) else None
        return len(tokens) if isinstance(tokens, list) else None

    async def render_chat(self, send: Sender, model: str, messages: list[dict[str, str]]) -> str | None:
        rendered = await send(Request("../apply-template", {"messages": messages}))
        prompt = rendered.get("prompt") if isinstance(rendered, dict) else None
        return prompt if isinstance(prompt, str) else None

    async def detokenize(self, send: Sender, model: str, tokens: list[int]) -> str | None:
        detokenized = await send(Request("../detokenize", {"tokens": tokens}))
        content = detokenized.get("content") if isinstance(detokenized, dict) else None
        return content if isinstance(content, str) else None
