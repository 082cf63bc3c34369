"""Where answers come from: the configured upstreams in this process, through the service the
server uses (`nudging_core.service`: its checks, limits, retries and fallback), or any
OpenAI-compatible endpoint over HTTP.

Answers are asked for without the proxy's clean-up: the runner cleans them itself, so the
text before clean-up (where the paper counts its nudging words) is known either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from nudging_core.config import Config
from nudging_core.nudging import Strategy
from nudging_core.protocol import ChatCompletionRequest, parse_request
from nudging_core.provenance import merge_spans
from nudging_core.registry import ModelRegistry
from nudging_core.service import ChoiceFinished, ChoiceRun, ErrorEvent, plan, run

from .datasets import Sample


@dataclass(frozen=True, slots=True)
class AnswerOptions:
    """What a run asks of the answerer besides the sample; None: the model's configuration."""

    max_tokens: int | None = None
    threshold: float | None = None
    strategy: Strategy | None = None


@dataclass(frozen=True, slots=True)
class BackendAnswer:
    output: str
    finish_reason: str | None
    # Provenance, when the answerer reports it (our proxy does; other servers do not).
    spans: list[dict[str, str]] | None = None
    # Each round's nudging words, in order (the paper's `all_nudging_words`). In-process every
    # nudging piece is one round's; an endpoint's report merges adjacent spans, so there two
    # rounds without base text between them count as one.
    round_nudging_words: list[str] | None = None
    rounds: int | None = None
    upstream_requests: dict[str, int] | None = None
    stop_reason: str | None = None
    completion_tokens: int | None = None


class Backend(Protocol):
    model: str

    async def generate(self, sample: Sample, options: AnswerOptions) -> BackendAnswer: ...

    async def aclose(self) -> None: ...


def chat_body(model: str, sample: Sample, options: AnswerOptions) -> dict[str, Any]:
    """The chat request for one sample: greedy, with provenance and without clean-up."""
    nudging: dict[str, Any] = {"return_provenance": True, "cleanup": False}
    if options.threshold is not None:
        nudging["threshold"] = options.threshold
    if options.strategy is not None:
        nudging["strategy"] = options.strategy
    body: dict[str, Any] = {
        "model": model,
        "messages": sample.messages(),
        "temperature": 0,
        "nudging": nudging,
    }
    if options.max_tokens is not None:
        body["max_tokens"] = options.max_tokens
    return body


class InProcessBackend:
    """A configured model name, run here: request model -> the service's plan -> its run."""

    def __init__(self, config: Config, model: str) -> None:
        self._registry = ModelRegistry(config)
        self._limits = config.server.limits
        served = self._registry.get(model)
        if served is None:
            raise ValueError(f"model {model!r} is not in the config")
        self._served = served
        self.model = model

    async def _answer(self, request: ChatCompletionRequest) -> ChoiceRun:
        plans = await plan(request, self._served, self._limits)
        answer: ChoiceRun | None = None
        async for event in run(plans, streaming=False):
            if isinstance(event, ErrorEvent):
                raise event.error
            if isinstance(event, ChoiceFinished):
                answer = event.choice
        assert answer is not None, "a run without errors finishes its choice"
        return answer

    async def generate(self, sample: Sample, options: AnswerOptions) -> BackendAnswer:
        request = parse_request(ChatCompletionRequest, chat_body(self.model, sample, options))
        answer = await self._answer(request)
        generation, pieces = answer.generation, answer.pieces
        stats = generation.stats
        return BackendAnswer(
            output="".join(piece.text for piece in pieces),
            finish_reason=generation.finish_reason,
            spans=[{"text": span.text, "source": span.source} for span in merge_spans(pieces)],
            round_nudging_words=[piece.text for piece in pieces if piece.source == "nudging"],
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

    async def generate(self, sample: Sample, options: AnswerOptions) -> BackendAnswer:
        response = await self._http.post("chat/completions", json=chat_body(self.model, sample, options))
        if response.status_code >= 400:
            raise EndpointError(f"HTTP {response.status_code}: {response.text[:300]}")
        answer = response.json()
        choice = answer["choices"][0]
        report = choice.get("nudging") or {}
        spans = report.get("spans")
        return BackendAnswer(
            output=choice["message"]["content"] or "",
            finish_reason=choice.get("finish_reason"),
            spans=spans,
            round_nudging_words=(
                [span["text"] for span in spans if span["source"] == "nudging"] if spans is not None else None
            ),
            rounds=report.get("rounds"),
            upstream_requests=report.get("upstream_requests"),
            stop_reason=report.get("stop_reason"),
            completion_tokens=(answer.get("usage") or {}).get("completion_tokens"),
        )

    async def aclose(self) -> None:
        await self._http.aclose()
