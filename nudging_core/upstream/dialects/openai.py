"""The OpenAI legacy completions shape: vLLM, SGLang, llama-cpp-python's server, ours.

They report, per generated token, the token string (vLLM: `bytes:\\x..` for partial UTF-8),
its logprob, a top-k dict and the token's character offset into the decoded text. The
decoded text is what we forward, so token texts are cut from it by those offsets; the raw
token strings are only used when they already join to the text.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Final

from pydantic import TypeAdapter, with_config
from typing_extensions import TypedDict

from nudging_core.types import Token

from ..call import CompletionCall
from ..errors import UpstreamError
from .base import ANSWER_SHAPE, Dialect, Parser, Reply, Request, Sender, checked

NEG_INF = -math.inf

# The fields of an answer (or stream event) read here, with their JSON types: anything else
# is a server bug or not a completions server, and must fail as an UpstreamError rather than
# as a TypeError somewhere further on. Unknown keys are kept (passthrough forwards logprobs).
@with_config(ANSWER_SHAPE)
class _Logprobs(TypedDict, total=False):
    tokens: list[str] | None
    token_logprobs: list[float | None] | None
    top_logprobs: list[dict[str, float | None] | None] | None
    text_offset: list[int] | None


@with_config(ANSWER_SHAPE)
class _Choice(TypedDict, total=False):
    text: str | None
    finish_reason: str | None
    logprobs: _Logprobs | None


@with_config(ANSWER_SHAPE)
class _Usage(TypedDict, total=False):
    prompt_tokens: int | None
    completion_tokens: int | None


@with_config(ANSWER_SHAPE)
class _Answer(TypedDict, total=False):
    choices: list[_Choice] | None
    usage: _Usage | None


_ANSWER: Final = TypeAdapter(_Answer)


def _answer(role: str, payload: Any) -> _Answer:
    return checked(_ANSWER, role, payload, "completions response")


def _top_logprob(chosen: float | None, top: dict[str, float | None] | None) -> float:
    candidates = [v for v in (top or {}).values() if v is not None]
    if chosen is not None:
        candidates.append(chosen)
    return max(candidates) if candidates else NEG_INF


def _token_texts(text: str, tokens: list[str], offsets: list[int] | None) -> list[str]:
    if "".join(tokens) == text:
        return list(tokens)
    if offsets and len(offsets) == len(tokens):
        start = offsets[0]
        relative = [o - start for o in offsets]
        if relative == sorted(relative) and relative[-1] <= len(text):
            bounds = relative + [len(text)]
            return [text[bounds[i] : bounds[i + 1]] for i in range(len(tokens))]
    # Undecodable alignment: keep the text whole on the last token so nothing is lost.
    return [""] * (len(tokens) - 1) + [text] if tokens else []


def _known_logprobs(top: dict[str, float | None] | None) -> dict[str, float] | None:
    return None if top is None else {token: value for token, value in top.items() if value is not None}


def parse_tokens(role: str, choice: _Choice, *, need_logprobs: bool) -> list[Token]:
    """Tokens of one choice (a whole completion or one streamed delta)."""
    text = choice.get("text") or ""
    logprobs = choice.get("logprobs")
    raw_tokens = logprobs.get("tokens") if logprobs else None
    if not logprobs or raw_tokens is None:
        if need_logprobs and text:
            raise UpstreamError(role, "response carries no logprobs; nudging needs them")
        return [Token(text, 0.0, 0.0)] if text else []
    token_logprobs = logprobs.get("token_logprobs") or [None] * len(raw_tokens)
    tops = logprobs.get("top_logprobs") or [None] * len(raw_tokens)
    texts = _token_texts(text, raw_tokens, logprobs.get("text_offset"))
    result = []
    for piece, chosen, top in zip(texts, token_logprobs, tops, strict=False):
        best = _top_logprob(chosen, top)
        if need_logprobs and best == NEG_INF:
            raise UpstreamError(role, "response carries no logprobs; nudging needs them")
        result.append(Token(piece, chosen if chosen is not None else best, best, _known_logprobs(top)))
    return result


def _choice_reply(role: str, payload: _Answer, *, need_logprobs: bool) -> Reply:
    reply = Reply()
    usage = payload.get("usage")
    if usage is not None:
        reply.prompt_tokens = usage.get("prompt_tokens")
        reply.completion_tokens = usage.get("completion_tokens")
    fingerprint = payload.get("system_fingerprint")
    reply.system_fingerprint = fingerprint if isinstance(fingerprint, str) else None
    for choice in payload.get("choices") or []:
        reply.tokens.extend(parse_tokens(role, choice, need_logprobs=need_logprobs))
        if choice.get("finish_reason"):
            reply.finish_reason = choice["finish_reason"]
            stop_reason = choice.get("stop_reason")
            reply.stop_reason = stop_reason if isinstance(stop_reason, str | int) else None
        reply.text += choice.get("text") or ""
        logprobs = choice.get("logprobs")
        if logprobs is not None and reply.logprobs is None:
            reply.logprobs = dict(logprobs)
    return reply


class OpenAICompletions(Dialect):
    name: ClassVar[str] = "openai"

    def completion(self, call: CompletionCall, model: str, *, stream: bool) -> Request:
        body: dict[str, Any] = {
            **call.extra,
            "model": model,
            "prompt": call.prompt,
            "max_tokens": call.max_tokens,
            "temperature": call.temperature,
            "top_p": call.top_p,
            "stream": stream,
        }
        if call.logprobs is not None:
            body["logprobs"] = call.logprobs
        if call.seed is not None:
            body["seed"] = call.seed
        if call.stop:
            body["stop"] = list(call.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return Request("completions", body)

    def parser(self, role: str, *, need_logprobs: bool, stream: bool) -> Parser:
        def parse(payload: Any) -> Reply:
            # A stream's usage event has no choices; a whole response always has one.
            answer = _answer(role, payload)
            if not stream and not answer.get("choices"):
                raise UpstreamError(role, "malformed completions response (no choices)")
            return _choice_reply(role, answer, need_logprobs=need_logprobs)

        return parse

    def tokenize(self, model: str, prompt: str) -> Request:
        # vLLM serves /tokenize at the server root, beside /v1.
        return Request("../tokenize", {"model": model, "prompt": prompt})

    def token_count(self, payload: Any) -> int | None:
        count = payload.get("count") if isinstance(payload, dict) else None
        return count if isinstance(count, int) else None

    async def render_chat(self, send: Sender, model: str, messages: list[dict[str, str]]) -> str | None:
        # vLLM renders a chat only into token ids; detokenizing them gives the prompt text.
        tokenized = await send(
            Request("../tokenize", {"model": model, "messages": messages, "add_generation_prompt": True})
        )
        tokens = tokenized.get("tokens") if isinstance(tokenized, dict) else None
        if not isinstance(tokens, list):
            return None
        prompt = await _detokenize(send, model, tokens)
        if prompt is None or not tokens:
            return None
        # A template that starts with `{{ bos_token }}` (Gemma, Llama 2 and 3) renders BOS as
        # text, and a completions request adds BOS again. Where it would, the prompt leaves
        # out the rendered BOS, so the upstream sees exactly the rendered tokens.
        again = await send(Request("../tokenize", {"model": model, "prompt": prompt}))
        retokenized = again.get("tokens") if isinstance(again, dict) else None
        if isinstance(retokenized, list) and retokenized == [tokens[0], *tokens]:
            bos = await _detokenize(send, model, tokens[:1])
            if bos and prompt.startswith(bos):
                return prompt[len(bos):]
        return prompt

    async def detokenize(self, send: Sender, model: str, tokens: list[int]) -> str | None:
        return await _detokenize(send, model, tokens)


async def _detokenize(send: Sender, model: str, tokens: list[Any]) -> str | None:
    detokenized = await send(Request("../detokenize", {"model": model, "tokens": tokens}))
    prompt = detokenized.get("prompt") if isinstance(detokenized, dict) else None
    return prompt if isinstance(prompt, str) else None
