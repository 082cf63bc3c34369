"""Where answers come from: the configured upstreams in this process, through the same core
and request handling the server uses, or any OpenAI-compatible endpoint over HTTP."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from nudging_core.generation import Generation
from nudging_core.provenance import merge_spans
from server.config import Config
from server.prompts import chat_prompts
from server.protocol import ChatCompletionRequest, parse_request
from server.registry import ModelRegistry
from server.runs import generation_requests

from .datasets import Sample


@dataclass(frozen=True, slots=True)
class Outcome:
    output: str
    finish_reason: str | None
    # Provenance, when the answerer reports it (our proxy does; other servers do not).
    spans: list[dict[str, str]] | None = None
    rounds: int | None = None
    upstream_requests: dict[str, int] | None = None
    stop_reason: str | None = None
    completion_tokens: int | None = None


class Backend(Protocol):
    model: str

    async def generate(self, sample: Sample, max_tokens: int | None, threshold: float | None) -> Outcome: ...

    async def aclose(self) -> None: ...


def chat_body(model: str, sample: Sample, max_tokens: int | None, threshold: float | None) -> dict[str, Any]:
    """The chat request for one sample: greedy, with the provenance extension asked for."""
    options: dict[str, Any] = {"return_provenance": True}
    if threshold is not None:
        options["threshold"] = threshold
    body: dict[str, Any] = {
        "model": model,
        "messages": sample.messages(),
        "temperature": 0,
        "nudging": options,
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


class InProcessBackend:
    """A configured model name, run here: request model -> prompts -> Generation."""

    def __init__(self, config: Config, model: str) -> None:
        self._registry = ModelRegistry(config)
        served = self._registry.get(model)
        if served is None:
            raise ValueError(f"model {model!r} is not in the config")
        self._served = served
        self.model = model

    async def generate(self, sample: Sample, max_tokens: int | None, threshold: float | None) -> Outcome:
        request = parse_request(ChatCompletionRequest, chat_body(self.model, sample, max_tokens, threshold))
        prompts = await chat_prompts(self._served, request)
        [generation_request] = generation_requests(self._served, request, prompts)
        generation = Generation(generation_request, self._served.pick_clients())
        pieces = [piece async for piece in generation.pieces()]
        stats = generation.stats
        return Outcome(
            output="".join(piece.text for piece in pieces),
            finish_reason=generation.finish_reason,
            spans=[{"text": span.text, "source": span.source} for span in merge_spans(pieces)],
            rounds=stats.rounds,
            upstream_requests=dict(stats.upstream_requests),
            stop_reason=stats.stop_reason,
            completion_tokens=generation.completion_tokens,
        )

    async def aclose(self) -> None:
        await self._registry.aclose()


class EndpointError(RuntimeError):
    """The endpoint refused or failed a request."""


class EndpointBackend:
    """Any OpenAI-compatible chat endpoint; rounds and requests come from our `nudging`
    response extension when the endpoint is this proxy."""

    def __init__(
        self, endpoint: str, model: str, api_key_env: str | None = None, timeout: float = 600
    ) -> None:
        key = os.environ.get(api_key_env) if api_key_env else None
        self._http = httpx.AsyncClient(
            base_url=endpoint.rstrip("/") + "/",
            timeout=timeout,
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )
        self.model = model

    async def generate(self, sample: Sample, max_tokens: int | None, threshold: float | None) -> Outcome:
        response = await self._http.post(
            "chat/completions", json=chat_body(self.model, sample, max_tokens, threshold)
        )
        if response.status_code >= 400:
            raise EndpointError(f"HTTP {response.status_code}: {response.text[:300]}")
        answer = response.json()
        choice = answer["choices"][0]
        report = choice.get("nudging") or {}
        return Outcome(
            output=choice["message"]["content"] or "",
            finish_reason=choice.get("finish_reason"),
            spans=report.get("spans"),
            rounds=report.get("rounds"),
            upstream_requests=report.get("upstream_requests"),
            stop_reason=report.get("stop_reason"),
            completion_tokens=(answer.get("usage") or {}).get("completion_tokens"),
        )

    async def aclose(self) -> None:
        await self._http.aclose()
