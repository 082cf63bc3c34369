"""A scripted upstream speaking the vLLM completions API, for tests that pin each rule.

The script is a set of documents: after prompt prefix P, the model writes the given tokens
(each with its top-1 probability), then ends (EOS) or keeps going if `eos=False` runs out
(the request then simply ends with `length`). A request's prompt must be some document's
prefix followed by a whole number of that document's tokens; the reply continues from there.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from nudging_core.upstream import UpstreamError


@dataclass(frozen=True)
class Document:
    prefix: str
    tokens: tuple[tuple[str, float], ...]
    eos: bool


@dataclass
class ScriptedUpstream:
    name: str = "scripted"
    documents: list[Document] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each completions request

    def add(self, prefix: str, tokens: list[tuple[str, float]], *, eos: bool = True) -> None:
        self.documents.append(Document(prefix, tuple(tokens), eos))

    def prompts(self) -> list[str]:
        return [request["prompt"] for request in self.requests]

    def continuation(self, prompt: str) -> tuple[list[tuple[str, float]], bool]:
        best: tuple[int, list[tuple[str, float]], bool] | None = None
        for document in self.documents:
            if not prompt.startswith(document.prefix):
                continue
            rest = prompt[len(document.prefix) :]
            consumed = ""
            for index in range(len(document.tokens) + 1):
                if consumed == rest:
                    if best is None or len(document.prefix) > best[0]:
                        best = (len(document.prefix), list(document.tokens[index:]), document.eos)
                    break
                if index == len(document.tokens) or not rest.startswith(consumed):
                    break
                consumed += document.tokens[index][0]
        if best is None:
            raise LookupError(f"{self.name}: no scripted continuation for prompt {prompt!r}")
        return best[1], best[2]

    def reply(self, prompt: str, max_tokens: int) -> tuple[list[tuple[str, float]], str]:
        tokens, eos = self.continuation(prompt)
        if len(tokens) > max_tokens:
            return tokens[:max_tokens], "length"
        return tokens, "stop" if eos else "length"

    def payloads(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The JSON answer to a completions request: one body, or the events of a stream
        (without `[DONE]`). Raises LookupError for a prompt the script does not continue."""
        prompt = body["prompt"]
        if isinstance(prompt, list):  # token ids: one per character, as /detokenize reads them
            prompt = "".join(chr(t) for t in prompt)
        tokens, finish = self.reply(prompt, body.get("max_tokens", 16))
        if body.get("stream"):
            return list(_stream_events(self.name, tokens, finish))
        return [{"id": "cmpl-x", "object": "text_completion", "model": self.name,
                 "choices": [{"index": 0, "text": "".join(t for t, _ in tokens),
                              "logprobs": _logprobs(tokens), "finish_reason": finish}],
                 "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": len(tokens),
                           "total_tokens": len(body["prompt"]) + len(tokens)}}]

    def answer(self, body: dict[str, Any], role: str) -> list[dict[str, Any]]:
        """The in-memory answer: `payloads`, or the error a client in `role` would raise."""
        self.requests.append(body)
        try:
            return self.payloads(body)
        except LookupError as error:
            raise UpstreamError(role, f"HTTP 500: {error}", status_code=500) from None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            try:
                payloads = self.payloads(body)
            except LookupError as error:
                return JSONResponse({"error": {"message": str(error)}}, status_code=500)
            if body.get("stream"):
                return StreamingResponse(_sse(payloads), media_type="text/event-stream")
            return payloads[0]

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.name, "object": "model", "max_model_len": 4096}]}

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict[str, Any]:
            # Like vLLM: a prompt is counted; messages are rendered (here as chatml) into
            # "token ids", one per character.
            body = await request.json()
            if "messages" in body:
                text = "".join(
                    f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body["messages"]
                )
                text += "<|im_start|>assistant\n"
                return {"tokens": [ord(c) for c in text], "count": len(text), "max_model_len": 4096}
            return {"count": len(body["prompt"]), "max_model_len": 4096}

        @app.post("/detokenize")
        async def detokenize(request: Request) -> dict[str, Any]:
            body = await request.json()
            return {"prompt": "".join(chr(t) for t in body["tokens"])}

        return app


def _logprobs(tokens: list[tuple[str, float]]) -> dict[str, Any]:
    offsets, position = [], 0
    for text, _ in tokens:
        offsets.append(position)
        position += len(text)
    return {
        "tokens": [text for text, _ in tokens],
        "token_logprobs": [math.log(prob) for _, prob in tokens],
        "top_logprobs": [{text: math.log(prob)} for text, prob in tokens],
        "text_offset": offsets,
    }


def _stream_events(name: str, tokens: list[tuple[str, float]], finish: str) -> Iterator[dict[str, Any]]:
    for index, token in enumerate(tokens):
        last = index == len(tokens) - 1
        choice = {"index": 0, "text": token[0], "logprobs": _logprobs([token]),
                  "finish_reason": finish if last else None}
        yield {"id": "cmpl-x", "model": name, "choices": [choice]}
    if not tokens:
        choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish}
        yield {"id": "cmpl-x", "model": name, "choices": [choice]}


async def _sse(payloads: list[dict[str, Any]]) -> AsyncIterator[str]:
    for payload in payloads:
        yield f"data: {json.dumps(payload)}\n\n"
    yield "data: [DONE]\n\n"
